// Command simple is a small HTTP service that is reachable only through a
// reverst tunnel: it dials the tunnel server, registers in a tunnel group
// with basic credentials, and answers every request with the path it got.
//
// From the repository root, with the tunnel server running on the bundled
// example configuration:
//
//	go run ./cmd/reverst/... -l debug -n flipt.dev.local -g examples/simple/group.yml -k examples/simple/server.key -c examples/simple/server.crt
//	go run ./examples/simple/main.go --username user --password pass
//	curl -H 'Host: flipt.dev.local' 127.0.0.1:8181/fo
//
// The tunnel server's certificate is verified against --ca (the bundled,
// demo-only server.crt) with the server name flipt.dev.local.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/reverst-dev/reverst/client"
)

// defaultCA is where the bundled certificate is, seen from the repository
// root, where the walkthrough runs.
const defaultCA = "examples/simple/server.crt"

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	flags := flag.NewFlagSet("simple", flag.ContinueOnError)
	var (
		username   = flags.String("username", "", "basic auth username for the tunnel group")
		password   = flags.String("password", "", "basic auth password for the tunnel group")
		address    = flags.String("tunnel-address", "127.0.0.1:7171", "address of the reverst tunnel server (QUIC, UDP)")
		group      = flags.String("group", "flipt.dev.local", "tunnel group to register in")
		serverName = flags.String("server-name", "flipt.dev.local", "name the tunnel server's certificate must carry")
		caPath     = flags.String("ca", defaultCA, "PEM certificate(s) trusted to verify the tunnel server")
		level      = flags.String("log", "info", "log level: debug, info, warn or error")
	)
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(os.Stderr, "invalid --log %q: %v\n", *level, err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	roots, err := loadCA(*caPath, *caPath == defaultCA)
	if err != nil {
		log.Error("loading the tunnel server's CA", "error", err)
		return 1
	}

	srv := &client.Server{
		TunnelGroup: *group,
		Handler:     handler(log),
		TLSConfig:   &tls.Config{RootCAs: roots, ServerName: *serverName},
		Logger:      log,
		OnConnectionReady: func(ci client.ConnectionInfo) {
			log.Info("ready: requests for the group's hosts now reach this service", "tunnel_server", ci.RemoteAddr.String())
		},
	}
	if *username != "" || *password != "" {
		srv.Authenticator = client.BasicAuthenticator(*username, *password)
	}

	// On SIGINT/SIGTERM, drain: finish the requests in flight, then leave.
	sigCtx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-sigCtx.Done()
		stop() // a second signal kills the process
		log.Info("shutting down")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Warn("shutdown cut requests short", "error", err)
		}
	}()

	log.Info("connecting to the tunnel server", "tunnel_address", *address, "group", *group)
	err = srv.DialAndServe(context.Background(), *address)
	switch {
	case errors.Is(err, client.ErrServerClosed):
		log.Info("stopped")
		return 0
	case errors.Is(err, client.ErrUnauthorized):
		log.Error("unauthorized: the tunnel server rejected the credentials for the group; check --username and --password", "group", *group)
	case errors.Is(err, client.ErrNotFound):
		log.Error("not found: the tunnel server has no such tunnel group; check --group", "group", *group)
	default:
		log.Error("tunnel client failed", "error", err)
	}
	return 1
}

// handler is the service itself.
func handler(log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.Info("request", "method", r.Method, "host", r.Host, "path", r.URL.Path)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintf(w, "Hello from the tunnel! You requested %s\n", r.URL.Path)
	})
}

// loadCA reads the trusted certificates. For the default path it also
// looks next to this source file, so that the example runs from its own
// directory too.
func loadCA(path string, isDefault bool) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && isDefault {
		if _, file, _, ok := runtime.Caller(0); ok {
			pem, err = os.ReadFile(filepath.Join(filepath.Dir(file), "server.crt"))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w (set --ca)", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate found", path)
	}
	return roots, nil
}
