package tunnel_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/internal/testtunnel"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// env is a running tunnel server on loopback.
type env struct {
	srv      *tunnel.Server
	addr     string // QUIC, and TCP for data connections on the same port
	dataAddr string // where data connections are served
	frontend string // http://...
	roots    *x509.CertPool
	pki      *testpki.PKI
	// quicOnly makes the members of join and serve stay on QUIC.
	quicOnly bool
}

func startServer(t testing.TB, defs ...tunnel.Group) *env {
	t.Helper()
	return startServerWith(t, func(*tunnel.Server) {}, defs...)
}

// startServerWith lets configure set the server's fields before it starts.
// The server takes data connections on the TCP port of its QUIC address.
func startServerWith(t testing.TB, configure func(*tunnel.Server), defs ...tunnel.Group) *env {
	t.Helper()
	return startServerData(t, true, configure, defs...)
}

// startServerData starts a server whose data connections are served on
// the QUIC port when samePort, and on another port (which clients never
// reach) otherwise.
func startServerData(t testing.TB, samePort bool, configure func(*tunnel.Server), defs ...tunnel.Group) *env {
	t.Helper()
	ts := testtunnel.Start(t, configure, samePort, defs...)
	return &env{srv: ts.Server, addr: ts.Addr, dataAddr: ts.DataAddr, frontend: ts.Frontend, roots: ts.PKI.Pool, pki: ts.PKI}
}

// path is the way the members of join and serve reach the server: over
// data connections, or over QUIC only.
type path struct{ quicOnly bool }

// paths runs f as subtest "data" with members on data connections and as
// subtest "quic" with members on QUIC only; servers started with p's
// methods give their members that path.
func paths(t *testing.T, f func(t *testing.T, p path)) {
	for _, p := range []path{{quicOnly: false}, {quicOnly: true}} {
		t.Run(p.String(), func(t *testing.T) { f(t, p) })
	}
}

func (p path) String() string {
	if p.quicOnly {
		return "quic"
	}
	return "data"
}

// start is startServer for members on path p.
func (p path) start(t testing.TB, defs ...tunnel.Group) *env {
	t.Helper()
	return p.startWith(t, func(*tunnel.Server) {}, defs...)
}

// startWith is startServerWith for members on path p.
func (p path) startWith(t testing.TB, configure func(*tunnel.Server), defs ...tunnel.Group) *env {
	t.Helper()
	e := startServerWith(t, configure, defs...)
	e.quicOnly = p.quicOnly
	return e
}

func (e *env) clientTLS() *tls.Config {
	return &tls.Config{RootCAs: e.roots, ServerName: "localhost", NextProtos: []string{protocol.ALPN}}
}

// get sends a request for host through the frontend.
// dialFrontend opens a visitor's TCP connection to the frontend, for
// requests written by hand; it is closed when the test ends.
func (e *env) dialFrontend(t testing.TB) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(e.frontend, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (e *env) get(t testing.TB, host, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, e.frontend+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// dialRaw opens a QUIC connection to the tunnel server without registering.
func (e *env) dialRaw(t testing.TB) *quic.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, e.addr, e.clientTLS(), &quic.Config{MaxIdleTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.CloseWithError(0, "") })
	return conn
}

// rawStream dials the server as a hand-made client and opens its register
// stream, for the test to write on it what it likes.
func (e *env) rawStream(t testing.TB) (*quic.Conn, *quic.Stream) {
	t.Helper()
	conn := e.dialRaw(t)
	str, err := conn.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return conn, str
}

// waitClosed waits for conn to be closed by the server and returns the
// application error it was closed with.
func waitClosed(t testing.TB, conn *quic.Conn, within time.Duration) *quic.ApplicationError {
	t.Helper()
	select {
	case <-conn.Context().Done():
	case <-time.After(within):
		t.Fatalf("connection still open after %s", within)
	}
	var appErr *quic.ApplicationError
	if !errors.As(context.Cause(conn.Context()), &appErr) {
		t.Fatalf("closed with %v, want an application error", context.Cause(conn.Context()))
	}
	return appErr
}

func TestUnknownHostIs502(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	code, body := e.get(t, "other.example", "/")
	if code != http.StatusBadGateway || !strings.Contains(body, "no tunnel group") {
		t.Fatalf("got %d %q, want 502 naming the missing group", code, body)
	}
}

func TestGroupWithoutMemberIs503(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"G.Example"}})
	code, body := e.get(t, "g.example:8181", "/")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no tunnel") {
		t.Fatalf("got %d %q, want 503", code, body)
	}
}

func TestGarbageRegistrationIsBadRequest(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	conn, str := e.rawStream(t)
	if _, err := str.Write([]byte("GET / HTTP/1.1\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	appErr := waitClosed(t, conn, 3*time.Second)
	if appErr.ErrorCode != protocol.CodeClientError || appErr.ErrorMessage != protocol.ReasonBadRequest {
		t.Fatalf("closed with %#x %q, want 0x2 %q", appErr.ErrorCode, appErr.ErrorMessage, protocol.ReasonBadRequest)
	}
	// The server still serves.
	if code, _ := e.get(t, "g.example", "/"); code != http.StatusServiceUnavailable {
		t.Fatalf("after garbage: got %d, want 503", code)
	}
}

func TestUnsupportedVersionIsBadRequest(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	conn, str := e.rawStream(t)
	if err := protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 9, TunnelGroup: "g"}); err != nil {
		t.Fatal(err)
	}
	appErr := waitClosed(t, conn, 3*time.Second)
	if appErr.ErrorCode != protocol.CodeClientError || appErr.ErrorMessage != protocol.ReasonBadRequest {
		t.Fatalf("closed with %#x %q, want bad request", appErr.ErrorCode, appErr.ErrorMessage)
	}
}

func TestUnknownGroupIsNotFound(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	conn, str := e.rawStream(t)
	if err := protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: "nope"}); err != nil {
		t.Fatal(err)
	}
	appErr := waitClosed(t, conn, 3*time.Second)
	if appErr.ErrorMessage != protocol.ReasonNotFound {
		t.Fatalf("closed with %#x %q, want not found", appErr.ErrorCode, appErr.ErrorMessage)
	}
}

func TestSilentClientIsClosed(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	silent := e.dialRaw(t)
	start := time.Now()
	// Another registration goes through while the silent one waits.
	_, str := e.rawStream(t)
	if err := protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: "g"}); err != nil {
		t.Fatal(err)
	}
	if _, err := protocol.ReadResponse(str); err != nil {
		t.Fatalf("second client's registration: %v", err)
	}
	if d := time.Since(start); d > 300*time.Millisecond {
		t.Fatalf("second registration took %s behind a silent client", d)
	}
	// Too slow is not malformed: the code lets a client on a stalled
	// network retry.
	appErr := waitClosed(t, silent, 3*time.Second)
	if appErr.ErrorCode != protocol.CodeServerError {
		t.Fatalf("silent client closed with %#x %q", appErr.ErrorCode, appErr.ErrorMessage)
	}
}

func TestStalledRequestMayRetry(t *testing.T) {
	// A request that stops halfway, as on a network that stalls, is closed
	// with the code a client retries, not as a bad request.
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	conn, str := e.rawStream(t)
	var req bytes.Buffer
	if err := protocol.WriteRequest(&req, &protocol.RegisterRequest{Version: 1, TunnelGroup: "g"}); err != nil {
		t.Fatal(err)
	}
	if _, err := str.Write(req.Bytes()[:req.Len()/2]); err != nil {
		t.Fatal(err)
	}
	appErr := waitClosed(t, conn, 3*time.Second)
	if appErr.ErrorCode != protocol.CodeServerError || appErr.ErrorMessage != "register request timed out" {
		t.Fatalf("stalled client closed with %#x %q", appErr.ErrorCode, appErr.ErrorMessage)
	}
}

// registerRaw registers a hand-made client with metadata md over its own
// UDP socket, which the caller can close to make the member vanish
// without a word, as a killed process does.
func (e *env) registerRaw(t testing.TB, group string, md map[string]string, qc *quic.Config) (*quic.Conn, *net.UDPConn, *protocol.RegisterResponse) {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { udp.Close() })
	raddr, err := net.ResolveUDPAddr("udp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := (&quic.Transport{Conn: udp}).Dial(ctx, raddr, e.clientTLS(), qc)
	if err != nil {
		t.Fatal(err)
	}
	str, err := conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: group, Metadata: md}); err != nil {
		t.Fatal(err)
	}
	resp, err := protocol.ReadResponse(str)
	if err != nil {
		t.Fatal(err)
	}
	return conn, udp, resp
}

func TestDeadMemberDroppedAfterAnnouncedKeepAlive(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	_, udp, _ := e.registerRaw(t, "g", map[string]string{protocol.MetadataKeepAlive: "100ms"},
		&quic.Config{KeepAlivePeriod: 100 * time.Millisecond, MaxIdleTimeout: 10 * time.Second})
	// The response is written before the member joins the group.
	e.waitMembers(t, "g", func(n int) bool { return n == 1 })
	// Alive and idle: the keep-alives keep it a member.
	time.Sleep(600 * time.Millisecond)
	if n := e.srv.Members()["g"]; n != 1 {
		t.Fatalf("live member dropped: members %d", n)
	}
	udp.Close()
	start := time.Now()
	for e.srv.Members()["g"] != 0 {
		if time.Since(start) > 3*time.Second {
			t.Fatal("dead member still registered after 3s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if d := time.Since(start); d > 700*time.Millisecond {
		t.Fatalf("dead member dropped after %s, want about 4 keep-alive periods", d)
	}
}

// A live member on a slow path (400 ms round trip, a satellite link) stays:
// its keep-alives come a round trip and more apart than its period.
func TestSlowPathMemberKept(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.ResolveUDPAddr("udp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.DialUDP("udp", nil, up)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { front.Close(); back.Close() })
	const oneWay = 200 * time.Millisecond
	var mu sync.Mutex
	var peer *net.UDPAddr
	go func() { // client -> server, delayed
		buf := make([]byte, 65535)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			mu.Lock()
			peer = from
			mu.Unlock()
			p := append([]byte(nil), buf[:n]...)
			time.AfterFunc(oneWay, func() { back.Write(p) })
		}
	}()
	go func() { // server -> client, delayed
		buf := make([]byte, 65535)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			p := append([]byte(nil), buf[:n]...)
			mu.Lock()
			to := peer
			mu.Unlock()
			time.AfterFunc(oneWay, func() { front.WriteToUDP(p, to) })
		}
	}()
	srv := &client.Server{TunnelGroup: "g", Handler: http.NotFoundHandler(), TLSConfig: e.clientTLS(), QUICOnly: true}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.DialAndServe(ctx, front.LocalAddr().String()) }()
	t.Cleanup(func() { cancel(); <-done })
	e.waitMembers(t, "g", func(n int) bool { return n == 1 })
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if n := e.srv.Members()["g"]; n != 1 {
			t.Fatalf("live member dropped on a 400ms RTT path (members %d)", n)
		}
	}
}

// 2. A request queued behind full members takes a member that joins.

func TestSilentOlderMemberKept(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	// No announcement and no keep-alives: only the idle timeout applies.
	e.registerRaw(t, "g", nil, &quic.Config{MaxIdleTimeout: 10 * time.Second})
	e.waitMembers(t, "g", func(n int) bool { return n == 1 })
	time.Sleep(1500 * time.Millisecond)
	if n := e.srv.Members()["g"]; n != 1 {
		t.Fatalf("older member without keep-alive dropped: members %d", n)
	}
}

// A request in flight on a member that dies is sent again to another
// member when it has no body, as soon as the member is declared dead.
func TestRequestOnDeadMemberRetried(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	conn, udp, _ := e.registerRaw(t, "g", map[string]string{protocol.MetadataKeepAlive: "100ms"},
		&quic.Config{KeepAlivePeriod: 100 * time.Millisecond, MaxIdleTimeout: 10 * time.Second})
	arrived := make(chan struct{}, 1)
	h3 := &http3.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-r.Context().Done()
	})}
	go func() { _ = h3.ServeQUICConn(conn) }()
	e.waitMembers(t, "g", func(n int) bool { return n == 1 })

	type result struct {
		code int
		body string
	}
	done := make(chan result, 1)
	go func() {
		code, body := e.get(t, "g.example", "/slow")
		done <- result{code, body}
	}()
	select {
	case <-arrived:
	case <-time.After(5 * time.Second):
		t.Fatal("request did not reach the first member")
	}
	e.join(t, "g", "b", nil)
	udp.Close() // the first member vanishes with the request in flight
	select {
	case r := <-done:
		if r.code != http.StatusOK || !strings.HasPrefix(r.body, "b GET /slow") {
			t.Fatalf("got %d %q, want the request answered by the live member", r.code, r.body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("request not answered")
	}
}

// A drain written right behind the register request, before the answer
// (a client told to stop while it registers), is a control message like
// any other: it must not be swallowed with the request's bytes.
func TestDrainRightAfterRequest(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
	_, str := e.rawStream(t)
	var msg bytes.Buffer
	if err := protocol.WriteRequest(&msg, &protocol.RegisterRequest{Version: 1, TunnelGroup: "g"}); err != nil {
		t.Fatal(err)
	}
	if err := protocol.WriteControl(&msg, &protocol.ControlMessage{Type: protocol.ControlDrain}); err != nil {
		t.Fatal(err)
	}
	// One write: request and drain arrive together.
	if _, err := str.Write(msg.Bytes()); err != nil {
		t.Fatal(err)
	}
	if _, err := protocol.ReadResponse(str); err != nil {
		t.Fatal(err)
	}
	e.waitMembers(t, "g", func(n int) bool { return n == 1 })
	deadline := time.Now().Add(2 * time.Second)
	for !draining(e.srv) {
		if time.Now().After(deadline) {
			t.Fatalf("the drain sent with the request was lost: %+v", e.srv.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if code, _ := e.get(t, "g.example", "/"); code != http.StatusServiceUnavailable {
		t.Fatalf("request to a group whose only member drains: %d, want 503", code)
	}
}
