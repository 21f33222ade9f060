package client_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/internal/testtunnel"
	"github.com/reverst-dev/reverst/tunnel"
)

// realServer is the project's own tunnel server on loopback, with data
// connections on the QUIC port, for tests of what a handler sees of a
// visitor's request on either transport.
type realServer struct {
	srv      *tunnel.Server
	addr     string // QUIC and data connections
	frontend string // http://...
	pki      *testpki.PKI
}

const realHost = "svc.example"

func startRealServer(t testing.TB) *realServer {
	t.Helper()
	ts := testtunnel.Start(t, nil, true, tunnel.Group{Name: "svc", Hosts: []string{realHost}})
	return &realServer{srv: ts.Server, addr: ts.Addr, frontend: ts.Frontend, pki: ts.PKI}
}

// join runs srv (its TunnelGroup, TLSConfig and OnConnectionReady set
// here) and waits until it is registered and, unless QUICOnly, has its
// spare data connections. It returns DialAndServe's result channel.
func (e *realServer) join(t testing.TB, srv *client.Server) <-chan error {
	t.Helper()
	ready := make(chan string, 1)
	srv.TunnelGroup = "svc"
	srv.TLSConfig = &tls.Config{RootCAs: e.pki.Pool, ServerName: "localhost"}
	srv.OnConnectionReady = func(ci client.ConnectionInfo) {
		select {
		case ready <- ci.LocalAddr.String():
		default:
		}
	}
	errc, _ := run(t, t.Context(), func(ctx context.Context) error { return srv.DialAndServe(ctx, e.addr) })
	select {
	case <-ready:
	case err := <-errc:
		t.Fatalf("member ended: %v", err)
	case <-time.After(waitTimeout):
		t.Fatal("member not registered in time")
	}
	if srv.QUICOnly {
		return errc
	}
	deadline := time.Now().Add(waitTimeout)
	for {
		n := 0
		for _, g := range e.srv.Status() {
			for _, m := range g.Members {
				n += m.DataConns
			}
		}
		if n >= 2 {
			return errc
		}
		if time.Now().After(deadline) {
			t.Fatalf("no data connections: %+v", e.srv.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// request returns a request for path to the group's host.
func (e *realServer) request(t testing.TB, ctx context.Context, method, path string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, e.frontend+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = realHost
	return req
}

// transports runs f once with requests on data connections and once on
// QUIC.
func transports(t *testing.T, f func(t *testing.T, quicOnly bool)) {
	t.Run("data", func(t *testing.T) { f(t, false) })
	t.Run("quic", func(t *testing.T) { f(t, true) })
}
