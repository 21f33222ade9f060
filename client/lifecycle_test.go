package client_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
)

// stuckHandler serves requests that ignore their context until the test
// ends, as a handler busy with slow work does.
func stuckHandler(t *testing.T) (http.Handler, <-chan struct{}) {
	started := make(chan struct{}, 16)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	return http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		started <- struct{}{}
		<-release
	}), started
}

// A lost connection is dialled again at once, whatever its handlers are
// still doing: the tunnel must not stay down for as long as the slowest
// of them, which the server can no longer answer anyway.
func TestReconnectsWhileHandlersRun(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	h, started := stuckHandler(t)
	srv.Handler = h
	serve(t, srv, ts.addr)
	m := ts.member(t)
	go func() { _, _, _ = m.get(t, "/") }()
	<-started

	_ = m.conn.CloseWithError(protocol.CodeOK, "going away")
	select {
	case <-ts.members:
	case <-time.After(2 * time.Second):
		t.Fatal("no new registration while a handler of the lost connection runs")
	}
}

// Close and a Shutdown whose ctx ends cut the connections at once, and
// DialAndServe returns then, as net/http's Serve does, rather than when
// the last handler that ignores its context is done.
func TestStopReturnsWhileHandlersRun(t *testing.T) {
	for _, how := range []string{"close", "shutdown deadline"} {
		t.Run(how, func(t *testing.T) {
			ts := newTunnelServer(t)
			srv, _ := newClient(ts)
			h, started := stuckHandler(t)
			srv.Handler = h
			errc, _ := serve(t, srv, ts.addr)
			m := ts.member(t)
			go func() { _, _, _ = m.get(t, "/") }()
			<-started

			if how == "close" {
				_ = srv.Close()
			} else {
				ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
				defer cancel()
				if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("Shutdown = %v, want DeadlineExceeded", err)
				}
			}
			if err := result(t, errc, 2*time.Second); !errors.Is(err, client.ErrServerClosed) {
				t.Errorf("DialAndServe = %v, want ErrServerClosed", err)
			}
		})
	}
}
