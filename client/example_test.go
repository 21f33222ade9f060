package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
)

// A service behind NAT exposes its handler through the tunnel group
// "flipt.dev.local", reconnecting by itself until interrupted, then
// draining its requests in flight.
func Example() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from the tunnel! You requested %s\n", r.URL.Path)
	})

	// Trust the tunnel server's certificate authority.
	caPEM, err := os.ReadFile("server.crt")
	if err != nil {
		slog.Error("reading CA", "error", err)
		return
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)

	srv := &client.Server{
		TunnelGroup:   "flipt.dev.local",
		Handler:       mux,
		TLSConfig:     &tls.Config{RootCAs: roots, ServerName: "flipt.dev.local"},
		Authenticator: client.BasicAuthenticator("user", "pass"),
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()

	// DialAndServe's own context stays alive so that Shutdown, not the
	// signal, decides when the connection closes.
	err = srv.DialAndServe(context.Background(), "127.0.0.1:7171")
	switch {
	case errors.Is(err, client.ErrServerClosed):
		slog.Info("stopped")
	case errors.Is(err, client.ErrUnauthorized):
		slog.Error("the tunnel server refused our credentials")
		os.Exit(1)
	default:
		slog.Error("tunnel client failed", "error", err)
		os.Exit(1)
	}
}

// Each successful registration, including every reconnection, can be
// observed with OnConnectionReady.
func ExampleServer_onConnectionReady() {
	srv := &client.Server{
		TunnelGroup: "flipt.dev.local",
		Handler:     http.NotFoundHandler(),
		OnConnectionReady: func(ci client.ConnectionInfo) {
			slog.Info("tunnel ready", "server", ci.RemoteAddr)
		},
		// Dial less often than the default during a long outage.
		MaxBackoff: 10 * time.Second,
	}
	_ = srv
}

// An event stream that ends when the Server drains, so that Shutdown need
// not wait for its context to end.
func ExampleServer_RegisterOnShutdown() {
	stopping := make(chan struct{})
	srv := &client.Server{
		TunnelGroup: "flipt.dev.local",
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				select {
				case t := <-tick.C:
					fmt.Fprintf(w, "data: %s\n\n", t.Format(time.RFC3339))
					_ = http.NewResponseController(w).Flush()
				case <-stopping:
					return
				case <-r.Context().Done():
					return
				}
			}
		}),
	}
	srv.RegisterOnShutdown(func() { close(stopping) })
	_ = srv
}

func ExampleBasicAuthenticator() {
	req := &protocol.RegisterRequest{Metadata: map[string]string{}}
	_ = client.BasicAuthenticator("user", "pass").Authenticate(context.Background(), req)
	fmt.Println(req.Authorization())
	// Output: Basic dXNlcjpwYXNz
}

func ExampleBearerAuthenticator() {
	req := &protocol.RegisterRequest{Metadata: map[string]string{}}
	_ = client.BearerAuthenticator("some-token").Authenticate(context.Background(), req)
	fmt.Println(req.Authorization())
	// Output: Bearer some-token
}

// A custom Authenticator computes credentials at each connection attempt,
// here for a group with an `external` strategy using the scheme JWT.
func ExampleAuthenticatorFunc() {
	mint := func() string { return "eyJhbGciOi..." } // a fresh token each time
	auth := client.AuthenticatorFunc(func(ctx context.Context, req *protocol.RegisterRequest) error {
		return client.SchemeAuthenticator("JWT", mint()).Authenticate(ctx, req)
	})

	req := &protocol.RegisterRequest{Metadata: map[string]string{}}
	_ = auth.Authenticate(context.Background(), req)
	fmt.Println(req.Authorization())
	// Output: JWT eyJhbGciOi...
}
