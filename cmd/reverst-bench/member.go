package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/reverst-dev/reverst/client"
)

// Paths served by the backend handler.
const (
	pathSmall = "/small"
	pathBig   = "/big"
)

// backend is the handler measured both directly and through the tunnel.
// Bodies are prepared once and sent with a Content-Length, so that the
// handler itself costs next to nothing.
func backend(smallSize, bigSize int) http.Handler {
	small := make([]byte, smallSize)
	for i := range small {
		small[i] = 'a' + byte(i%26)
	}
	big := make([]byte, bigSize)
	for i := range big {
		big[i] = byte(i)
	}
	serve := func(body []byte) http.HandlerFunc {
		length := strconv.Itoa(len(body))
		return func(w http.ResponseWriter, _ *http.Request) {
			h := w.Header()
			h.Set("Content-Type", "application/octet-stream")
			h.Set("Content-Length", length)
			_, _ = w.Write(body)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+pathSmall, serve(small))
	mux.Handle("GET "+pathBig, serve(big))
	return mux
}

// memberMain is the member role: it serves the backend handler on a TCP
// listener (when -backend) and through -n tunnel registrations, prints
// "backend ADDR" and "ready N" on stdout, and runs until stdin closes or
// it is signalled.
func memberMain(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("member", flag.ContinueOnError)
	tunnelAddr := fs.String("tunnel", "", "tunnel server QUIC address")
	group := fs.String("group", benchGroup, "tunnel group")
	n := fs.Int("n", 1, "registrations")
	caPath := fs.String("ca", "", "PEM certificate of the tunnel server")
	serveDirect := fs.Bool("backend", false, "also serve the handler over HTTP/1.1 on a loopback port")
	quicOnly := fs.Bool("quic-only", false, "carry every request over QUIC")
	smallSize := fs.Int("small-size", 100, "small body size")
	bigSize := fs.Int("big-size", 1<<20, "large body size")
	if err := fs.Parse(args); err != nil {
		return err
	}
	stopProfile, err := startProfile()
	if err != nil {
		return err
	}
	defer func() { _ = stopProfile() }()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The bench closes our stdin when it is done, or dies.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()

	h := backend(*smallSize, *bigSize)
	if *serveDirect {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		fmt.Fprintf(stdout, "backend %s\n", ln.Addr())
	}

	pem, err := os.ReadFile(*caPath)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", *caPath)
	}
	tlsConf := &tls.Config{RootCAs: roots, ServerName: serverName}

	// At most this many registrations are in progress at once, so that
	// 1,000 tunnels do not arrive as one burst of handshakes.
	const dialing = 64
	sem := make(chan struct{}, dialing)
	var (
		wg    sync.WaitGroup
		ready sync.WaitGroup
		errs  = make(chan error, *n)
	)
	ready.Add(*n)
	servers := make([]*client.Server, *n)
	for i := range servers {
		var once sync.Once
		registered := func() { once.Do(func() { <-sem; ready.Done() }) }
		servers[i] = &client.Server{
			TunnelGroup:       *group,
			Handler:           h,
			TLSConfig:         tlsConf,
			Authenticator:     client.BasicAuthenticator(benchUser, benchPassword),
			Logger:            log.With("member", i),
			QUICOnly:          *quicOnly,
			OnConnectionReady: func(client.ConnectionInfo) { registered() },
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := servers[i].DialAndServe(ctx, *tunnelAddr)
			if !errors.Is(err, client.ErrServerClosed) {
				errs <- err
			}
			registered()
		}()
	}
	allReady := make(chan struct{})
	go func() { ready.Wait(); close(allReady) }()
	select {
	case <-allReady:
		if len(errs) > 0 {
			return fmt.Errorf("registration: %w", <-errs)
		}
		fmt.Fprintf(stdout, "ready %d\n", *n)
	case err := <-errs:
		return fmt.Errorf("registration: %w", err)
	case <-ctx.Done():
	}

	select {
	case <-ctx.Done():
	case err := <-errs:
		return fmt.Errorf("tunnel: %w", err)
	}
	for _, s := range servers {
		_ = s.Close()
	}
	wg.Wait()
	return nil
}
