// Package testtunnel runs the project's tunnel server on loopback for
// tests of other packages: QUIC and data connections on one port, an HTTP
// frontend, and a checked stop when the test ends.
package testtunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// Server is a running tunnel server.
type Server struct {
	*tunnel.Server
	Addr     string // QUIC
	DataAddr string // data connections
	Frontend string // http://...
	PKI      *testpki.PKI
}

// Start starts a server serving defs, whose fields configure (if not nil)
// sets first. Data connections are served on the TCP port of the QUIC
// address, or, without samePort, on another port, which clients never
// reach.
func Start(t testing.TB, configure func(*tunnel.Server), samePort bool, defs ...tunnel.Group) *Server {
	t.Helper()
	pki := testpki.New(t)
	udp, tcp, err := tunnel.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if !samePort {
		tcp.Close()
		if tcp, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	srv := &tunnel.Server{RegisterTimeout: 500 * time.Millisecond, DataConnections: true}
	if configure != nil {
		configure(srv)
	}
	tr := &quic.Transport{Conn: udp, VerifySourceAddress: srv.VerifySourceAddress, ConnContext: srv.ConnContext}
	ln, err := tr.Listen(&tls.Config{
		Certificates: []tls.Certificate{pki.Cert},
		NextProtos:   []string{protocol.ALPN},
		MinVersion:   tls.VersionTLS13,
	}, &quic.Config{MaxIdleTimeout: 5 * time.Second, KeepAlivePeriod: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.SetGroups(defs); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 2)
	go func() {
		served <- srv.ServeData(tcp, &tls.Config{Certificates: []tls.Certificate{pki.Cert}, MinVersion: tls.VersionTLS13})
	}()
	go func() { served <- srv.Serve(ln) }()
	front := httptest.NewServer(srv)
	t.Cleanup(func() {
		front.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		ln.Close()
		tcp.Close()
		for range 2 {
			if err := <-served; !errors.Is(err, tunnel.ErrServerClosed) {
				t.Errorf("Serve or ServeData returned %v, want ErrServerClosed", err)
			}
		}
		tr.Close()
	})
	return &Server{Server: srv, Addr: ln.Addr().String(), DataAddr: tcp.Addr().String(), Frontend: front.URL, PKI: pki}
}
