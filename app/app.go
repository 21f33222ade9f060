// Package app is reverst's composition root: it reads the configuration
// from flags and the environment, wires the tunnel server, its group source,
// authentication and metrics together, and supervises the long-running
// tasks (QUIC listener, HTTP frontend, management server, source watcher)
// so that the process stops as a whole when one of them fails.
package app

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/auth"
	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/sources"
	"github.com/reverst-dev/reverst/tunnel"
)

// Main runs the server with the process's arguments and environment until
// ctx is done, and returns the exit status: 0 after a clean stop, 1 when
// the server failed, 2 for a configuration error.
func Main(ctx context.Context, args []string, stderr io.Writer) int {
	cfg, err := ParseConfig(args, nil, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "reverst: %v\n", err)
		return 2
	}
	level, _ := cfg.level()
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	// The process is the server's alone: its parallelism may follow the
	// load (see procGovernor).
	if err := run(ctx, cfg, logger, true); err != nil {
		logger.Error("reverst stopped", "error", err)
		if errors.Is(err, ErrUsage) {
			// A setting found wrong only once used, such as a groups
			// source of an unknown scheme.
			return 2
		}
		return 1
	}
	return 0
}

// Run starts the server described by cfg and supervises it until ctx is
// done (a clean stop, nil) or one of its tasks fails (that error).
func Run(ctx context.Context, cfg *Config, logger *slog.Logger) error {
	return run(ctx, cfg, logger, false)
}

// run is Run; with govern, GOMAXPROCS follows the frontends' load.
func run(ctx context.Context, cfg *Config, logger *slog.Logger, govern bool) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// When the certificate served expires, read from the files on scrape
	// (at most every keyPairCheck), as they are renewed.
	expiry := func(name string, k *keyPair) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "reverst_certificate_not_after_timestamp_seconds",
			Help:        "When the certificate served expires, in Unix seconds, following its files as they are renewed: tunnel (QUIC, data connections, and the HTTPS frontend unless it has its own), https (the HTTPS frontend's own).",
			ConstLabels: prometheus.Labels{"certificate": name},
		}, k.NotAfter))
	}

	name := cfg.settings().Name
	tunnelPair := &keyPair{
		certPath:   cfg.CertificatePath,
		keyPath:    cfg.PrivateKeyPath,
		flags:      fmt.Sprintf("%s %q and %s %q", name("certificate-path"), cfg.CertificatePath, name("private-key-path"), cfg.PrivateKeyPath),
		log:        logger,
		serverName: cfg.ServerName,
	}
	cert, err := tunnelPair.load()
	if err != nil {
		return err
	}
	expiry("tunnel", tunnelPair)

	srv := &tunnel.Server{
		Logger:                logger.With("component", "tunnel"),
		Metrics:               tunnel.NewMetrics(reg),
		TrustForwardedHeaders: cfg.TrustForwardedHeaders,
		MaxRequestsPerMember:  cfg.MaxRequestsPerMember,
		QueueTimeout:          cfg.QueueTimeout,
		RegistrationRate:      cfg.RegistrationRate,
		RegistrationBurst:     cfg.RegistrationBurst,
		DataConnections:       true,
	}
	secrets := &sources.Secrets{Logger: logger.With("component", "secrets")}
	defer secrets.Close()
	authn := &auth.Factory{
		Logger:          logger.With("component", "auth"),
		ReadSecret:      secrets.Read,
		CacheSize:       cfg.ExternalAuthCache,
		CacheAllowTTL:   cfg.ExternalAuthAllowTTL,
		CacheDenyTTL:    cfg.ExternalAuthDenyTTL,
		ExternalTimeout: cfg.ExternalAuthTimeout,
		Registerer:      reg,
	}
	w := &wiring{cfg: cfg, logger: logger, srv: srv, reg: reg, newAuth: func(a groups.Authentication) (tunnel.Authenticator, error) {
		return authn.New(a)
	}}
	source, err := sources.Open(cfg.TunnelGroups, sources.Options{
		Logger:       logger.With("component", "sources"),
		Registerer:   reg,
		PollInterval: cfg.GroupsPoll,
	})
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrUsage, name("tunnel-groups"), err)
	}
	initial, err := source.Load(ctx)
	if err != nil {
		if ctx.Err() != nil {
			// Stopped while a source was slow to answer: a clean stop.
			logger.Info("reverst stopped before it started")
			return nil
		}
		return fmt.Errorf("loading tunnel groups of %s: %w", name("tunnel-groups"), err)
	}
	if err := w.apply(initial); err != nil {
		return fmt.Errorf("applying tunnel groups from %s: %w", source, err)
	}

	resetKey, err := statelessResetKey(*cert)
	if err != nil {
		return err
	}
	udp, dataLn, err := tunnel.Listen(cfg.TunnelAddress)
	if err != nil {
		return fmt.Errorf("%s %q: %w", name("tunnel-address"), cfg.TunnelAddress, err)
	}
	defer dataLn.Close()
	tr := &quic.Transport{
		Conn:              udp,
		StatelessResetKey: resetKey,
		// Source addresses are checked with a Retry before any handshake,
		// and the registration rate limit applies then too.
		VerifySourceAddress: srv.VerifySourceAddress,
		ConnContext:         srv.ConnContext,
	}
	defer tr.Close()
	ln, err := tr.Listen(&tls.Config{
		GetCertificate: tunnelPair.GetCertificate,
		NextProtos:     []string{protocol.ALPN},
		MinVersion:     tls.VersionTLS13,
		ServerName:     cfg.ServerName,
	}, &quic.Config{
		MaxIdleTimeout:  cfg.MaxIdleTimeout,
		KeepAlivePeriod: cfg.KeepAlivePeriod,
		// A client opens one bidirectional stream, the register stream;
		// more would only let a connection not yet registered park data
		// in flow-control windows.
		MaxIncomingStreams: 1,
	})
	if err != nil {
		return fmt.Errorf("%s %q: %w", name("tunnel-address"), cfg.TunnelAddress, err)
	}
	defer ln.Close()
	frontendLn, err := net.Listen("tcp", cfg.HTTPAddress)
	if err != nil {
		return fmt.Errorf("%s %q: %w", name("http-address"), cfg.HTTPAddress, err)
	}
	defer frontendLn.Close()
	var handler http.Handler = srv
	if govern {
		meter := &loadMeter{}
		handler = meter.wrap(srv)
		stop := governParallelism(meter, logger)
		defer stop()
	}
	newFrontend := func() *http.Server {
		return &http.Server{
			Handler:           handler,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    cfg.MaxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		}
	}
	frontends := []frontend{{name: "http frontend", srv: newFrontend(), ln: frontendLn}}
	if cfg.HTTPSAddress != "" {
		httpsPair := tunnelPair
		if cfg.HTTPSCertificatePath != "" {
			httpsPair = &keyPair{
				certPath: cfg.HTTPSCertificatePath,
				keyPath:  cfg.HTTPSPrivateKeyPath,
				flags:    fmt.Sprintf("%s %q and %s %q", name("https-certificate-path"), cfg.HTTPSCertificatePath, name("https-private-key-path"), cfg.HTTPSPrivateKeyPath),
				log:      logger,
			}
			if _, err := httpsPair.load(); err != nil {
				return err
			}
			expiry("https", httpsPair)
		}
		httpsLn, err := net.Listen("tcp", cfg.HTTPSAddress)
		if err != nil {
			return fmt.Errorf("%s %q: %w", name("https-address"), cfg.HTTPSAddress, err)
		}
		defer httpsLn.Close()
		https := newFrontend()
		https.TLSConfig = &tls.Config{
			GetCertificate: httpsPair.GetCertificate,
			NextProtos:     []string{"h2", "http/1.1"},
			MinVersion:     tls.VersionTLS12,
		}
		frontends = append(frontends, frontend{name: "https frontend", srv: https, ln: httpsLn, tls: true})
	}

	// One deadline bounds the whole stop, from its first step: a container
	// runtime kills the process once its own grace period is over.
	stopCtx, cancelStop := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelStop()
	var (
		deadlineOnce   sync.Once
		deadline       context.Context
		cancelDeadline context.CancelFunc = func() {}
	)
	defer func() { cancelDeadline() }()
	graceful := func() context.Context {
		deadlineOnce.Do(func() {
			deadline, cancelDeadline = context.WithTimeout(stopCtx, cfg.ShutdownTimeout)
		})
		return deadline
	}

	stopSignal := make(chan struct{})
	tasks := []task{
		{
			name: "signal",
			run: func() error {
				select {
				case <-ctx.Done():
				case <-stopSignal:
				}
				return nil
			},
			stop: func(error) { close(stopSignal) },
		},
		{
			name: "frontends",
			run:  func() error { return serveFrontends(frontends, logger) },
			stop: func(error) {
				// Load balancers stop sending visitors while the
				// frontends drain, and tunnel clients register with
				// the replicas that stay: a member registered now
				// would serve nobody and be cut when the drain ends.
				// The members here keep the requests in flight.
				_ = ln.Close()
				w.ready.Store(false)
				shutdownFrontends(graceful(), frontends, logger)
			},
		},
	}
	if cfg.ManagementAddress != "" {
		mgmtLn, err := net.Listen("tcp", cfg.ManagementAddress)
		if err != nil {
			return fmt.Errorf("%s %q: %w", name("management-address"), cfg.ManagementAddress, err)
		}
		defer mgmtLn.Close()
		mgmt := managementServer(w.management(source))
		tasks = append(tasks, task{
			name: "management server",
			run: func() error {
				logger.Info("serving management API", "address", mgmtLn.Addr().String())
				if err := mgmt.Serve(mgmtLn); !errors.Is(err, http.ErrServerClosed) {
					return fmt.Errorf("management server: %w", err)
				}
				return nil
			},
			stop: func(error) { _ = mgmt.Shutdown(graceful()) },
		})
	}
	if cfg.WatchGroups {
		watchCtx, cancelWatch := context.WithCancel(stopCtx)
		tasks = append(tasks, task{
			name: "groups source",
			run: func() error {
				logger.Info("watching tunnel groups", "source", source.String())
				if err := source.Watch(watchCtx, w.apply); err != nil && !errors.Is(err, context.Canceled) {
					return fmt.Errorf("watching %s: %w", source, err)
				}
				return nil
			},
			stop: func(error) { cancelWatch() },
		})
	}
	tasks = append(tasks, task{
		name: "data connection listener",
		run: func() error {
			conf := &tls.Config{GetCertificate: tunnelPair.GetCertificate, MinVersion: tls.VersionTLS13}
			if err := srv.ServeData(dataLn, conf); !errors.Is(err, tunnel.ErrServerClosed) {
				return err
			}
			return nil
		},
		// Data connections end with their members, which the tunnel task
		// closes; only new ones are refused here.
		stop: func(error) { _ = dataLn.Close() },
	})
	// The tunnel task comes last: its stop runs after the frontend drained,
	// so that in-flight requests keep their members until they finish.
	tasks = append(tasks, task{
		name: "tunnel listener",
		run: func() error {
			logger.Info("accepting tunnels", "address", ln.Addr().String(), "server_name", cfg.ServerName)
			// The listener is closed as the stop begins, before the
			// server is shut down.
			if err := srv.Serve(ln); !errors.Is(err, tunnel.ErrServerClosed) && !errors.Is(err, quic.ErrServerClosed) {
				return err
			}
			return nil
		},
		stop: func(error) {
			_ = srv.Shutdown(graceful())
			_ = ln.Close()
		},
	})

	w.ready.Store(true)
	failed, err := supervise(tasks)
	if err != nil {
		return fmt.Errorf("%s: %w", failed, err)
	}
	logger.Info("reverst stopped cleanly")
	return nil
}

// managementServer serves the management API. Its IdleTimeout closes
// connections idle for a minute (probes and scrapes that come more often
// keep theirs): without it a connection kept alive after one request is
// held for good, and a few thousand would use up the process's file
// descriptors, the tunnels' included.
func managementServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute}
}

// statelessResetKey derives the QUIC stateless reset key from the TLS
// private key, so that it survives restarts: a restarted server answers
// packets of its predecessor's connections with a stateless reset, and
// clients reconnect at once instead of waiting for their idle timeout.
func statelessResetKey(cert tls.Certificate) (*quic.StatelessResetKey, error) {
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("deriving the stateless reset key from --private-key-path: %w", err)
	}
	b, err := hkdf.Key(sha256.New, der, nil, "reverst quic stateless reset key", len(quic.StatelessResetKey{}))
	if err != nil {
		return nil, err
	}
	var key quic.StatelessResetKey
	copy(key[:], b)
	return &key, nil
}
