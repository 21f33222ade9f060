package client_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
)

// testHandler answers with the host and path it got, and misbehaves on
// demand.
func testHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello %s %s", r.Host, r.URL.Path)
	})
	mux.HandleFunc("/panic", func(w http.ResponseWriter, _ *http.Request) {
		// Headers for an answer that never comes.
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Set-Cookie", "session=half-made")
		panic("boom")
	})
	mux.HandleFunc("/panic-late", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("partial"))
		http.NewResponseController(w).Flush()
		panic("boom after the headers")
	})
	mux.HandleFunc("/abort", func(http.ResponseWriter, *http.Request) {
		panic(http.ErrAbortHandler)
	})
	return mux
}

// newClient returns a client for ts with the right credentials and a log
// recorder.
func newClient(ts *tunnelServer) (*client.Server, *logRecorder) {
	rec := newLogRecorder()
	return &client.Server{
		TunnelGroup:   testGroup,
		Handler:       testHandler(),
		TLSConfig:     &tls.Config{RootCAs: ts.pki.Pool},
		Authenticator: client.BasicAuthenticator("user", "pass"),
		Logger:        slog.New(rec),
	}, rec
}

func serve(t *testing.T, srv *client.Server, addr string) (<-chan error, context.CancelFunc) {
	t.Helper()
	return run(t, t.Context(), func(ctx context.Context) error { return srv.DialAndServe(ctx, addr) })
}

// closedBy returns the error the peer closed conn with.
func closedBy(t *testing.T, conn *quic.Conn) *quic.ApplicationError {
	t.Helper()
	select {
	case <-conn.Context().Done():
	case <-time.After(waitTimeout):
		t.Fatal("connection not closed")
	}
	var appErr *quic.ApplicationError
	if !errors.As(context.Cause(conn.Context()), &appErr) || !appErr.Remote {
		t.Fatalf("connection closed by %v, want a close from the client", context.Cause(conn.Context()))
	}
	return appErr
}

func TestServesRequests(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	ready := make(chan client.ConnectionInfo, 1)
	srv.OnConnectionReady = func(ci client.ConnectionInfo) { ready <- ci }
	errc, cancel := serve(t, srv, ts.addr)

	m := ts.member(t)
	if m.req.Version != protocol.Version || m.req.TunnelGroup != testGroup || m.req.Authorization() != testAuth {
		t.Errorf("register request = %+v", m.req)
	}
	// The handshake verified the certificate against the host of the
	// address (an IP, which TLS does not send as SNI): no ServerName was
	// configured, and crypto/tls refuses to verify without one.
	if m.sni != "" {
		t.Errorf("SNI = %q, want none for an IP address", m.sni)
	}
	code, body := m.mustGet(t, "/fo")
	if code != http.StatusOK || body != "Hello "+testHost+" /fo" {
		t.Errorf("GET /fo = %d %q", code, body)
	}
	select {
	case ci := <-ready:
		if ci.Addr != ts.addr || ci.RemoteAddr.String() != ts.addr || ci.LocalAddr == nil || ci.Response == nil || ci.Response.Code != protocol.ResponseOK {
			t.Errorf("ConnectionInfo = %+v", ci)
		}
	default:
		t.Error("OnConnectionReady was not called before the first request")
	}

	cancel()
	err := result(t, errc, quickTimeout)
	if !errors.Is(err, client.ErrServerClosed) || !errors.Is(err, context.Canceled) {
		t.Errorf("DialAndServe after cancel = %v, want ErrServerClosed and context.Canceled", err)
	}
	if appErr := closedBy(t, m.conn); appErr.ErrorCode != protocol.CodeOK {
		t.Errorf("client closed with %v, want code 0", appErr)
	}
}

func TestRegistrationRefused(t *testing.T) {
	tests := []struct {
		name   string
		legacy bool // refusal as a RegisterResponse code instead of a close
		setup  func(*client.Server, *tunnelServer)
		want   error
	}{
		{
			name:  "wrong password",
			setup: func(s *client.Server, _ *tunnelServer) { s.Authenticator = client.BasicAuthenticator("user", "wrong") },
			want:  client.ErrUnauthorized,
		},
		{
			name:  "no credentials",
			setup: func(s *client.Server, _ *tunnelServer) { s.Authenticator = nil },
			want:  client.ErrUnauthorized,
		},
		{
			name:  "unknown group",
			setup: func(s *client.Server, _ *tunnelServer) { s.TunnelGroup = "nope" },
			want:  client.ErrNotFound,
		},
		{
			name: "bad request",
			setup: func(_ *client.Server, ts *tunnelServer) {
				ts.setVerdict(func(*protocol.RegisterRequest) error { return protocol.ErrBadRequest })
			},
			want: client.ErrBadRequest,
		},
		{
			name:   "legacy unauthorized code",
			legacy: true,
			setup:  func(s *client.Server, _ *tunnelServer) { s.Authenticator = client.BearerAuthenticator("t") },
			want:   client.ErrUnauthorized,
		},
		{
			name:   "legacy not found code",
			legacy: true,
			setup:  func(s *client.Server, _ *tunnelServer) { s.TunnelGroup = "nope" },
			want:   client.ErrNotFound,
		},
	}
	sentinels := []error{client.ErrUnauthorized, client.ErrNotFound, client.ErrBadRequest}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTunnelServer(t)
			ts.legacy.Store(tt.legacy)
			srv, _ := newClient(ts)
			tt.setup(srv, ts)
			errc, _ := serve(t, srv, ts.addr)

			// Promptly: a retry loop would take at least a backoff delay
			// and register again.
			err := result(t, errc, quickTimeout)
			for _, s := range sentinels {
				if got := errors.Is(err, s); got != (s == tt.want) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, got)
				}
			}
			if n := ts.attempts.Load(); n != 1 {
				t.Errorf("server saw %d register requests, want 1 (no retry)", n)
			}
			var appErr *quic.ApplicationError
			if !tt.legacy && !errors.As(err, &appErr) {
				t.Errorf("error %v does not carry the QUIC close", err)
			}
		})
	}
}

func TestInvalidSettingsFailAtOnce(t *testing.T) {
	for name, tt := range map[string]struct {
		group, addr string
		want        error
	}{
		"empty group":     {"", "127.0.0.1:1", client.ErrBadRequest},
		"address no port": {testGroup, "127.0.0.1", nil},
		"address no host": {testGroup, ":7171", nil},
	} {
		t.Run(name, func(t *testing.T) {
			srv := &client.Server{TunnelGroup: tt.group}
			// Bounded: a setting that is retried instead would block until
			// the test's deadline.
			ctx, cancel := context.WithTimeout(t.Context(), quickTimeout)
			defer cancel()
			err := srv.DialAndServe(ctx, tt.addr)
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) || errors.Is(err, client.ErrServerClosed) {
				t.Errorf("DialAndServe = %v, want a settings error (%v)", err, tt.want)
			}
		})
	}
}

func TestRetryNotFound(t *testing.T) {
	ts := newTunnelServer(t)
	ts.setVerdict(func(*protocol.RegisterRequest) error { return protocol.ErrNotFound })
	srv, rec := newClient(ts)
	srv.RetryNotFound = true
	serve(t, srv, ts.addr)

	rec.waitFor(t, "retrying")
	ts.setVerdict(defaultVerdict) // the group appears, as after a reload
	m := ts.member(t)
	if code, _ := m.mustGet(t, "/"); code != http.StatusOK {
		t.Errorf("GET / = %d", code)
	}
	if n := ts.attempts.Load(); n < 2 {
		t.Errorf("register requests = %d, want a retry", n)
	}
}

// A server that never answers the register request is reported as such,
// and retried: the failure names the timeout that ended the attempt, not
// the close the client used to interrupt it.
func TestRegisterTimeoutIsReported(t *testing.T) {
	ts := newTunnelServer(t)
	answer := make(chan struct{})
	t.Cleanup(func() { close(answer) })
	ts.setVerdict(func(*protocol.RegisterRequest) error { <-answer; return nil })
	srv, rec := newClient(ts)
	srv.RegisterTimeout = 100 * time.Millisecond
	serve(t, srv, ts.addr)

	line := rec.waitFor(t, "retrying")
	if !strings.Contains(line, "no register response within 100ms") || !strings.Contains(line, context.DeadlineExceeded.Error()) {
		t.Errorf("failure logged as %q, want the register timeout", line)
	}
}

func TestReconnectsAfterServerCloses(t *testing.T) {
	for _, code := range []quic.ApplicationErrorCode{protocol.CodeOK, protocol.CodeServerError} {
		t.Run(fmt.Sprintf("code %d", code), func(t *testing.T) {
			ts := newTunnelServer(t)
			srv, rec := newClient(ts)
			serve(t, srv, ts.addr)

			first := ts.member(t)
			_ = first.conn.CloseWithError(code, "going away")
			second := ts.member(t)
			if code, body := second.mustGet(t, "/again"); code != http.StatusOK || body != "Hello "+testHost+" /again" {
				t.Errorf("GET after reconnect = %d %q", code, body)
			}
			rec.waitFor(t, "going away")
		})
	}
}

func TestReconnectsWhenServerComesBack(t *testing.T) {
	ts := newTunnelServer(t)
	srv, rec := newClient(ts)
	serve(t, srv, ts.addr)
	ts.member(t)

	ts.stop()
	// Wait until the client is dialing an address nobody listens on.
	rec.waitFor(t, "dialing")

	back := time.Now()
	ts.listen(ts.addr)
	m := ts.member(t)
	took := time.Since(back)
	t.Logf("registered again %v after the server came back", took)
	if took > 2*time.Second {
		t.Errorf("reconnect took %v after the server came back, want under 2s", took)
	}
	if code, _ := m.mustGet(t, "/"); code != http.StatusOK {
		t.Errorf("GET after reconnect = %d", code)
	}
}

func TestStopWhileRetrying(t *testing.T) {
	for _, how := range []string{"cancel", "shutdown"} {
		for _, phase := range []string{"dialing", "waiting"} {
			t.Run(how+" while "+phase, func(t *testing.T) {
				ts := newTunnelServer(t)
				ts.stop() // nothing listens on ts.addr: every dial times out
				srv, rec := newClient(ts)
				if phase == "waiting" {
					// One quick failed dial, then a wait that would last
					// for the whole test.
					srv.QUICConfig = &quic.Config{HandshakeIdleTimeout: 200 * time.Millisecond}
					srv.MinBackoff, srv.MaxBackoff = time.Hour, time.Hour
				}
				errc, cancel := serve(t, srv, ts.addr)
				if phase == "waiting" {
					rec.waitFor(t, "retrying")
				}

				if how == "cancel" {
					cancel()
				} else if err := srv.Shutdown(t.Context()); err != nil {
					t.Errorf("Shutdown = %v", err)
				}
				// Promptly: neither the dial (1.5s) nor the wait is sat out.
				err := result(t, errc, time.Second)
				if !errors.Is(err, client.ErrServerClosed) {
					t.Errorf("DialAndServe = %v, want ErrServerClosed", err)
				}
			})
		}
	}
}

func TestDialAndServeAfterShutdown(t *testing.T) {
	srv := &client.Server{TunnelGroup: testGroup}
	if err := srv.Shutdown(t.Context()); err != nil {
		t.Fatalf("Shutdown of an unused server = %v", err)
	}
	if err := srv.DialAndServe(t.Context(), "127.0.0.1:1"); !errors.Is(err, client.ErrServerClosed) {
		t.Errorf("DialAndServe after Shutdown = %v, want ErrServerClosed", err)
	}
}

func TestShutdownDrainsInFlightRequests(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	started, release := make(chan struct{}), make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/slow", func(w http.ResponseWriter, _ *http.Request) {
		close(started)
		<-release
		_, _ = w.Write([]byte("slow done"))
	})
	mux.HandleFunc("/fast", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("fast"))
	})
	srv.Handler = mux
	errc, _ := serve(t, srv, ts.addr)
	m := ts.member(t)

	type res struct {
		code int
		body string
		err  error
	}
	slow := make(chan res, 1)
	go func() {
		code, body, err := m.get(t, "/slow")
		slow <- res{code, body, err}
	}()
	<-started

	shutdown := shutdownAsync(srv)

	select {
	case <-m.drained:
	case <-time.After(waitTimeout):
		t.Fatal("the client did not announce the drain")
	}
	// A request that crossed the announcement (or comes from a server that
	// ignores it) is still served.
	if code, body := m.mustGet(t, "/fast"); code != http.StatusOK || body != "fast" {
		t.Errorf("GET /fast while draining = %d %q", code, body)
	}
	select {
	case err := <-shutdown:
		t.Fatalf("Shutdown returned %v while a request was in flight", err)
	default:
	}

	close(release)
	if r := <-slow; r.err != nil || r.code != http.StatusOK || r.body != "slow done" {
		t.Errorf("in-flight request = %+v, want a complete 200", r)
	}
	select {
	case err := <-shutdown:
		if err != nil {
			t.Errorf("Shutdown = %v", err)
		}
	case <-time.After(quickTimeout):
		t.Fatal("Shutdown did not return after the last request finished")
	}
	if err := result(t, errc, quickTimeout); !errors.Is(err, client.ErrServerClosed) || errors.Is(err, context.Canceled) {
		t.Errorf("DialAndServe after Shutdown = %v, want ErrServerClosed alone", err)
	}
	if appErr := closedBy(t, m.conn); appErr.ErrorCode != protocol.CodeOK {
		t.Errorf("client closed with %v, want code 0", appErr)
	}
	select {
	case m := <-ts.members:
		t.Errorf("client registered again after Shutdown: %+v", m.req)
	default:
	}
}

func TestShutdownDeadline(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	started := make(chan struct{})
	srv.Handler = http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		close(started)
		<-r.Context().Done() // a handler that only stops when told
	})
	errc, _ := serve(t, srv, ts.addr)
	m := ts.member(t)
	failed := make(chan error, 1)
	go func() {
		_, _, err := m.get(t, "/")
		failed <- err
	}()
	<-started

	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want DeadlineExceeded", err)
	}
	closedBy(t, m.conn)
	if err := <-failed; err == nil {
		t.Error("the stuck request succeeded after the connection was closed")
	}
	if err := result(t, errc, quickTimeout); !errors.Is(err, client.ErrServerClosed) {
		t.Errorf("DialAndServe = %v, want ErrServerClosed", err)
	}
}

func TestHandlerPanicKeepsTunnel(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	serve(t, srv, ts.addr)
	m := ts.member(t)

	for range 10 {
		code, body := m.mustGet(t, "/panic")
		if code != http.StatusInternalServerError {
			t.Fatalf("GET /panic = %d %q, want 500", code, body)
		}
	}
	req, err := http.NewRequest(http.MethodGet, "https://"+testHost+"/panic", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := m.cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if h := resp.Header; h.Get("Content-Encoding") != "" || h.Get("Set-Cookie") != "" {
		t.Errorf("the 500 carries the handler's headers: %v", h)
	}
	// Once the response has started a 500 is impossible: the stream must
	// be reset rather than look complete.
	for _, path := range []string{"/panic-late", "/abort"} {
		if code, body, err := m.get(t, path); err == nil {
			t.Errorf("GET %s = %d %q, want a reset stream", path, code, body)
		}
	}
	if code, body := m.mustGet(t, "/after"); code != http.StatusOK || body != "Hello "+testHost+" /after" {
		t.Errorf("GET after panics = %d %q", code, body)
	}
	if m.conn.Context().Err() != nil {
		t.Error("the tunnel connection died")
	}
	if n := ts.attempts.Load(); n != 1 {
		t.Errorf("register requests = %d, want 1 (the tunnel must survive)", n)
	}
}

func TestTLSConfigIsNotModified(t *testing.T) {
	ts := newTunnelServer(t)
	shared := &tls.Config{RootCAs: ts.pki.Pool, NextProtos: []string{"h3"}}
	named := &tls.Config{RootCAs: ts.pki.Pool, ServerName: testSNI}

	var members []*member
	for _, conf := range []*tls.Config{shared, shared, named} {
		srv, _ := newClient(ts)
		srv.TLSConfig = conf
		serve(t, srv, ts.addr)
		members = append(members, ts.member(t))
	}
	if !slices.Equal(shared.NextProtos, []string{"h3"}) || shared.ServerName != "" {
		t.Errorf("shared config modified: NextProtos %q, ServerName %q", shared.NextProtos, shared.ServerName)
	}
	if named.NextProtos != nil || named.ServerName != testSNI {
		t.Errorf("named config modified: NextProtos %q, ServerName %q", named.NextProtos, named.ServerName)
	}
	sni := []string{members[0].sni, members[1].sni, members[2].sni}
	slices.Sort(sni)
	if want := []string{"", "", testSNI}; !slices.Equal(sni, want) {
		t.Errorf("server names = %q, want %q", sni, want)
	}
}

func TestUntrustedServerIsRetried(t *testing.T) {
	ts := newTunnelServer(t)
	srv, rec := newClient(ts)
	srv.TLSConfig = nil // system roots do not know the test certificate
	errc, _ := serve(t, srv, ts.addr)

	rec.waitFor(t, "certificate")
	rec.waitFor(t, "retrying")
	select {
	case err := <-errc:
		t.Fatalf("DialAndServe gave up on a TLS failure: %v", err)
	default:
	}
	if n := ts.attempts.Load(); n != 0 {
		t.Errorf("register requests = %d over an unverified connection", n)
	}
}

func TestSharedTransport(t *testing.T) {
	ts := newTunnelServer(t)
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: udp}
	t.Cleanup(func() { tr.Close() })
	var ms []*member
	for range 2 {
		srv, _ := newClient(ts)
		srv.Transport = tr
		_, cancel := serve(t, srv, ts.addr)
		t.Cleanup(cancel)
		ms = append(ms, ts.member(t))
	}
	for _, m := range ms {
		if got := m.conn.RemoteAddr().String(); got != udp.LocalAddr().String() {
			t.Errorf("registration came from %s, want the shared socket %s", got, udp.LocalAddr())
		}
		if code, body := m.mustGet(t, "/x"); code != http.StatusOK {
			t.Errorf("GET /x = %d %q", code, body)
		}
	}
}

// A handler that cannot finish its response after the header (here a
// reverse proxy whose backend dies mid-body) cuts the stream, so that the
// visitor sees an error rather than a short body that looks complete.
func TestUnfinishedProxiedResponseIsCut(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = brw.WriteString("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
		_ = brw.Flush()
	}))
	defer backend.Close()
	target, err := url.Parse(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.ErrorLog = log.New(io.Discard, "", 0)
	srv.Handler = proxy
	serve(t, srv, ts.addr)
	m := ts.member(t)
	if code, body, err := m.get(t, "/"); err == nil {
		t.Fatalf("GET = %d %q, want a reset stream", code, body)
	}
}
