package client_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
)

// shutdownAsync starts srv's Shutdown, given waitTimeout, and returns
// its result channel.
func shutdownAsync(srv *client.Server) <-chan error {
	shutdown := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		shutdown <- srv.Shutdown(ctx)
	}()
	return shutdown
}

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

// A handler holding a response open (an event stream here) learns from
// RegisterOnShutdown that the server is stopping, and ends it: Shutdown
// returns then, rather than at its deadline, and the visitor gets a
// complete stream.
func TestRegisterOnShutdownEndsLongResponses(t *testing.T) {
	transports(t, func(t *testing.T, quicOnly bool) {
		e := startRealServer(t)
		stopping := make(chan struct{})
		streaming := make(chan struct{})
		srv := &client.Server{QUICOnly: quicOnly, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = io.WriteString(w, "data: hello\n\n")
			_ = http.NewResponseController(w).Flush()
			close(streaming)
			<-stopping
			_, _ = io.WriteString(w, "data: bye\n\n")
		})}
		srv.RegisterOnShutdown(func() { close(stopping) })
		errc := e.join(t, srv)
		resp, err := http.DefaultClient.Do(e.request(t, t.Context(), http.MethodGet, "/events"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		<-streaming

		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		start := time.Now()
		if err := srv.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown = %v after %v", err, time.Since(start))
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("Shutdown took %v", d)
		}
		if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "data: hello\n\ndata: bye\n\n" {
			t.Errorf("stream %q, %v", b, err)
		}
		if err := result(t, errc, 2*time.Second); !errors.Is(err, client.ErrServerClosed) {
			t.Errorf("DialAndServe = %v, want ErrServerClosed", err)
		}
	})
}

// A graceful Shutdown waits for every handler, whichever transport its
// request came on, even when the tunnel connection is lost meanwhile: a
// handler serving a data connection's request is as much in flight as
// one serving a request over QUIC.
func TestShutdownWaitsForHandlersOfLostConnection(t *testing.T) {
	transports(t, func(t *testing.T, quicOnly bool) {
		e := startRealServer(t)
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: udp}
		t.Cleanup(func() { _ = tr.Close(); _ = udp.Close() })
		started, release := make(chan struct{}), make(chan struct{})
		releaseOnce := sync.OnceFunc(func() { close(release) })
		t.Cleanup(releaseOnce)
		srv := &client.Server{QUICOnly: quicOnly, Transport: tr, Handler: http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
			close(started)
			<-release // slow work that ignores its context
		})}
		e.join(t, srv)
		go func() {
			if resp, err := http.DefaultClient.Do(e.request(t, t.Context(), http.MethodGet, "/")); err == nil {
				resp.Body.Close()
			}
		}()
		<-started

		shutdown := shutdownAsync(srv)
		// The tunnel connection is lost during the drain.
		_ = tr.Close()
		select {
		case err := <-shutdown:
			t.Fatalf("Shutdown returned %v while a handler was running", err)
		case <-time.After(time.Second):
		}
		releaseOnce()
		select {
		case err := <-shutdown:
			if err != nil {
				t.Errorf("Shutdown = %v", err)
			}
		case <-time.After(waitTimeout):
			t.Fatal("Shutdown did not return once the handler did")
		}
	})
}
