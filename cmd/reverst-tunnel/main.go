// Command reverst-tunnel exposes a local HTTP service through a reverst
// tunnel group: it registers with the tunnel server (on every address its
// name resolves to) and proxies the requests the server forwards to the
// local service with [httputil.ReverseProxy].
//
//	REVERST_PASSWORD=pass reverst-tunnel -a tunnel.example.com:7171 -g app.example.com -u user http 8080
//
// Every flag also reads an environment variable REVERST_*; run it with -h
// for the list. The visitor's Host header is passed to the local service
// unchanged by default (--host-header preserve), as reverst does for
// services registered with the client library; --host-header rewrite sends
// the target's host instead, for local servers that only answer to their
// own name.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/reverst-dev/reverst/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal starts the drain, a second one kills the
		// process the default way.
		<-ctx.Done()
		stop()
	}()
	os.Exit(run(ctx, os.Args[1:], nil, os.Stderr))
}

// run runs the command until the tunnel server refuses it (status 1) or
// ctx is done (drain, status 0). environ nil means the process
// environment.
func run(ctx context.Context, args []string, environ map[string]string, stderr io.Writer) int {
	cfg, err := parseConfig(args, environ, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "reverst-tunnel: %v\n", err)
		return 2
	}
	level, _ := cfg.level()
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	tlsConf, err := cfg.tlsConfig()
	if err != nil {
		fmt.Fprintf(stderr, "reverst-tunnel: %v\n", err)
		return 2
	}
	if cfg.Insecure {
		logger.Warn("INSECURE: the tunnel server's certificate is not verified (--insecure): anyone on the path can impersonate it, read the credentials and the traffic")
	}
	authn := cfg.authenticator()
	if authn == nil {
		logger.Warn("no credentials given: only an open tunnel group accepts this registration")
	}

	srv := &client.Server{
		TunnelGroup:   cfg.Group,
		Handler:       logRequests(newProxy(cfg.target, cfg.HostHeader, logger), logger),
		TLSConfig:     tlsConf,
		Authenticator: authn,
		Logger:        logger,
		QUICOnly:      cfg.QUICOnly,
	}
	logger.Info("exposing local service", "target", cfg.target.Redacted(), "group", cfg.Group, "tunnel_address", cfg.TunnelAddress, "host_header", cfg.HostHeader)

	done := make(chan error, 1)
	// Not ctx: a signal drains through Shutdown instead of cutting the
	// connections.
	go func() { done <- srv.DialAndServe(context.WithoutCancel(ctx), cfg.TunnelAddress) }()

	select {
	case err := <-done:
		fmt.Fprintf(stderr, "reverst-tunnel: %s\n", explain(err, cfg))
		return 1
	case <-ctx.Done():
	}
	logger.Info("shutting down: draining requests in flight", "timeout", cfg.ShutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		logger.Warn("requests still in flight after the shutdown timeout were cut", "error", err)
	}
	if err := <-done; !errors.Is(err, client.ErrServerClosed) {
		fmt.Fprintf(stderr, "reverst-tunnel: %s\n", explain(err, cfg))
		return 1
	}
	logger.Info("stopped")
	return 0
}

// explain turns DialAndServe's error into a message for the operator; the
// client's log line just before it has the details.
func explain(err error, cfg *config) string {
	switch {
	case errors.Is(err, client.ErrUnauthorized):
		return fmt.Sprintf("the tunnel server refused the registration: unauthorized: check the credentials for group %q (--username/--password or --token)", cfg.Group)
	case errors.Is(err, client.ErrNotFound):
		return fmt.Sprintf("the tunnel server refused the registration: not found: it has no tunnel group %q (--group)", cfg.Group)
	case errors.Is(err, client.ErrBadRequest):
		return fmt.Sprintf("the tunnel server refused the registration: bad request: %v", err)
	}
	return err.Error()
}
