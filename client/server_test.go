package client_test

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/protocol"
)

// This file holds a minimal tunnel server for the tests: it speaks the
// registration protocol with the real protocol package over real QUIC on
// loopback, then uses each registered connection as an HTTP/3 client, as
// the real tunnel server does.

const (
	testGroup    = "flipt.dev.local"
	testAuth     = "Basic dXNlcjpwYXNz" // user:pass
	testHost     = "flipt.dev.local"
	testSNI      = "tunnel.test"
	waitTimeout  = 10 * time.Second
	quickTimeout = 5 * time.Second
)

// newPKI makes a self-signed certificate for 127.0.0.1 and tunnel.test.
func newPKI(t testing.TB) *testpki.PKI { return testpki.New(t, testSNI, "127.0.0.1") }

// member is a registered tunnel connection, seen from the server.
type member struct {
	conn *quic.Conn
	cc   *http3.ClientConn
	req  *protocol.RegisterRequest
	sni  string
	// drained is closed when the client announces it is draining.
	drained chan struct{}
}

// get sends GET path with the test Host to the member and returns the
// status and body.
func (m *member) get(t testing.TB, path string) (int, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+testHost+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := m.cc.RoundTrip(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// mustGet is get for requests that must succeed.
func (m *member) mustGet(t testing.TB, path string) (int, string) {
	t.Helper()
	code, body, err := m.get(t, path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return code, body
}

// tunnelServer is the test's registration server.
type tunnelServer struct {
	t    testing.TB
	pki  *testpki.PKI
	addr string

	// verdict decides a registration: nil accepts; a protocol sentinel is
	// sent as the matching 0x2 close. Replaceable while running.
	verdict atomic.Pointer[func(*protocol.RegisterRequest) error]
	// legacy, when set, answers refusals with a RegisterResponse code
	// instead of a close, as old servers did.
	legacy atomic.Bool

	attempts atomic.Int64 // register requests received
	members  chan *member

	mu  sync.Mutex
	ln  *quic.Listener
	all []*quic.Conn
}

func defaultVerdict(req *protocol.RegisterRequest) error {
	switch {
	case req.TunnelGroup != testGroup:
		return protocol.ErrNotFound
	case req.Authorization() != testAuth:
		return protocol.ErrUnauthorized
	}
	return nil
}

func newTunnelServer(t testing.TB) *tunnelServer {
	t.Helper()
	// A port below the ephemeral range, which a test that stops the
	// server finds free when it starts it again.
	return newTunnelServerAt(t, newPKI(t), testnet.Addr(t, testnet.UDP))
}

// newTunnelServerAt starts a server with pki's certificate on addr.
func newTunnelServerAt(t testing.TB, pki *testpki.PKI, addr string) *tunnelServer {
	t.Helper()
	s := &tunnelServer{t: t, pki: pki, members: make(chan *member, 16)}
	v := defaultVerdict
	s.verdict.Store(&v)
	s.listen(addr)
	t.Cleanup(s.stop)
	return s
}

func (s *tunnelServer) setVerdict(v func(*protocol.RegisterRequest) error) { s.verdict.Store(&v) }

// listen starts accepting on addr (again, after stop, on the same port).
func (s *tunnelServer) listen(addr string) {
	s.t.Helper()
	tlsConf := &tls.Config{Certificates: []tls.Certificate{s.pki.Cert}, NextProtos: []string{protocol.ALPN}}
	ln, err := quic.ListenAddr(addr, tlsConf, &quic.Config{KeepAlivePeriod: time.Second})
	if err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.ln = ln
	s.addr = ln.Addr().String()
	s.mu.Unlock()
	go s.accept(ln)
}

func (s *tunnelServer) accept(ln *quic.Listener) {
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		s.mu.Lock()
		s.all = append(s.all, conn)
		s.mu.Unlock()
		go s.handle(conn)
	}
}

func (s *tunnelServer) handle(conn *quic.Conn) {
	ctx, cancel := context.WithTimeout(conn.Context(), quickTimeout)
	defer cancel()
	stream, err := conn.AcceptStream(ctx)
	if err != nil {
		_ = conn.CloseWithError(protocol.CodeClientError, protocol.ReasonBadRequest)
		return
	}
	req, err := protocol.ReadRequest(stream)
	if err != nil {
		_ = conn.CloseWithError(protocol.CodeClientError, protocol.ReasonBadRequest)
		return
	}
	s.attempts.Add(1)
	if err := (*s.verdict.Load())(req); err != nil {
		if s.legacy.Load() {
			code := map[error]protocol.ResponseCode{
				protocol.ErrBadRequest:   protocol.ResponseBadRequest,
				protocol.ErrNotFound:     protocol.ResponseNotFound,
				protocol.ErrUnauthorized: protocol.ResponseUnauthorized,
			}[err]
			_ = protocol.WriteResponse(stream, &protocol.RegisterResponse{Version: protocol.Version, Code: code})
			_ = stream.Close()
			return
		}
		_ = conn.CloseWithError(protocol.CodeClientError, err.Error())
		return
	}
	if err := protocol.WriteResponse(stream, &protocol.RegisterResponse{Version: protocol.Version, Code: protocol.ResponseOK}); err != nil {
		return
	}
	_ = stream.Close()
	m := &member{
		conn:    conn,
		cc:      (&http3.Transport{}).NewClientConn(conn),
		req:     req,
		sni:     conn.ConnectionState().TLS.ServerName,
		drained: make(chan struct{}),
	}
	go func() {
		r := protocol.NewControlReader(stream)
		for {
			msg, err := r.Next()
			if err != nil {
				return
			}
			if msg.Type == protocol.ControlDrain {
				close(m.drained)
				return
			}
		}
	}()
	s.members <- m
}

// member waits for the next registration.
func (s *tunnelServer) member(t testing.TB) *member {
	t.Helper()
	select {
	case m := <-s.members:
		return m
	case <-time.After(waitTimeout):
		t.Fatal("no client registered in time")
		return nil
	}
}

// stop closes every connection with CodeOK, as a server shutting down
// does, then the listener.
func (s *tunnelServer) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.all {
		_ = c.CloseWithError(protocol.CodeOK, "server shutting down")
	}
	s.all = nil
	if s.ln != nil {
		_ = s.ln.Close()
		s.ln = nil
	}
}

// logRecorder is a slog handler that forwards messages to the test, so that
// tests wait on what the client reports instead of sleeping.
type logRecorder struct {
	msgs chan string
}

func newLogRecorder() *logRecorder { return &logRecorder{msgs: make(chan string, 1024)} }

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logRecorder) WithGroup(string) slog.Handler            { return h }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.String())
		return true
	})
	select {
	case h.msgs <- b.String():
	default: // never block the client under test
	}
	return nil
}

// waitFor waits for a log message containing substr.
func (h *logRecorder) waitFor(t testing.TB, substr string) string {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		select {
		case m := <-h.msgs:
			if strings.Contains(m, substr) {
				return m
			}
		case <-deadline:
			t.Fatalf("no log line containing %q", substr)
			return ""
		}
	}
}

// run starts DialAndServe in the background and returns a channel with
// its result and the function that cancels its context.
func run(t testing.TB, ctx context.Context, dial func(context.Context) error) (<-chan error, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		errc <- dial(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(waitTimeout):
			t.Error("DialAndServe did not return after its context ended")
		}
	})
	return errc, cancel
}

// result waits for DialAndServe's result.
func result(t testing.TB, errc <-chan error, within time.Duration) error {
	t.Helper()
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("DialAndServe returned nil")
		}
		return err
	case <-time.After(within):
		t.Fatalf("DialAndServe did not return within %v", within)
		return nil
	}
}
