package tunnel_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// dataConns returns the data connections of the members of group.
func (e *env) dataConns(group string) []int {
	var n []int
	for _, g := range e.srv.Status() {
		if g.Name == group {
			for _, m := range g.Members {
				n = append(n, m.DataConns)
			}
		}
	}
	return n
}

// Plain requests take the data connections (HTTP/1.1 at the member), and
// bodies of several MiB cross them intact both ways; members on QUIC only
// get HTTP/3.
func TestDataConnectionsCarryRequests(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		var protos sync.Map
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			protos.Store(r.Proto, true)
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("X-Body-Sha256", hex.EncodeToString(h.Sum(nil)))
			w.Header().Set("X-Body-Len", fmt.Sprint(n))
			if r.URL.Path == "/big" {
				_, _ = io.CopyN(w, bytes.NewReader(bigBody), int64(len(bigBody)))
			}
		}))

		resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/big", nil))
		got, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, bigBody) {
			t.Fatalf("GET /big: %d, %d bytes, %v", resp.StatusCode, len(got), err)
		}

		upload := make([]byte, 3<<20+17)
		_, _ = rand.Read(upload)
		sum := sha256.Sum256(upload)
		resp = e.do(t, e.newRequest(t, t.Context(), http.MethodPost, "/upload", bytes.NewReader(upload)))
		_, _ = io.Copy(io.Discard, resp.Body)
		if h := resp.Header.Get("X-Body-Sha256"); resp.StatusCode != http.StatusOK || h != hex.EncodeToString(sum[:]) {
			t.Fatalf("POST: %d, member saw %s bytes with sha256 %s", resp.StatusCode, resp.Header.Get("X-Body-Len"), h)
		}

		want := "HTTP/1.1"
		if p.quicOnly {
			want = "HTTP/3.0"
		}
		protos.Range(func(k, _ any) bool {
			if k != want {
				t.Errorf("member got a request over %s, want only %s", k, want)
			}
			return true
		})
		if n := e.dataConns("svc"); len(n) != 1 || (n[0] == 0) != p.quicOnly {
			t.Errorf("data connections per member: %v", n)
		}
	})
}

var bigBody = func() []byte {
	b := make([]byte, 4<<20+3)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}()

// holder is a member handler that counts the requests it gets over data
// connections (HTTP/1.1) and over QUIC, and holds each until released.
type holder struct {
	data, quic atomic.Int64
	mu         sync.Mutex
	release    chan struct{}
}

func newHolder() *holder { return &holder{release: make(chan struct{})} }

func (h *holder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		h.data.Add(1)
	} else {
		h.quic.Add(1)
	}
	h.mu.Lock()
	release := h.release
	h.mu.Unlock()
	<-release
}

// wait waits, for 5 s at most, until n requests are held.
func (h *holder) wait(n int64) {
	deadline := time.Now().Add(5 * time.Second)
	for h.data.Load()+h.quic.Load() < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// releaseAll lets the held requests go and holds the next ones again.
func (h *holder) releaseAll() {
	h.mu.Lock()
	close(h.release)
	h.release = make(chan struct{})
	h.mu.Unlock()
}

// A burst of long requests arriving one after the other finds a spare data
// connection each time: the member opens new spares as they get busy.
func TestDataConnectionsGrowWithLoad(t *testing.T) {
	e := startServer(t, svc)
	h := newHolder()
	e.serve(t, "svc", h)
	const n = 16
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/", nil))
			_, _ = io.Copy(io.Discard, resp.Body)
		})
		time.Sleep(50 * time.Millisecond)
	}
	h.wait(n)
	conns := e.dataConns("svc")
	h.releaseAll()
	wg.Wait()
	t.Logf("%d requests on data connections, %d on QUIC; %v data connections", h.data.Load(), h.quic.Load(), conns)
	if h.data.Load() != n {
		t.Errorf("%d of %d requests went over data connections", h.data.Load(), n)
	}
	if len(conns) != 1 || conns[0] < n+2 {
		t.Errorf("data connections %v, want at least %d (busy plus spares)", conns, n+2)
	}
}

// A burst that arrives all at once outruns the spares and partly goes
// over QUIC; the member opens a data connection for each request that did,
// so that the same burst a moment later finds enough of them.
func TestDataConnectionsCatchUpWithBurst(t *testing.T) {
	e := startServer(t, svc)
	h := newHolder()
	e.serve(t, "svc", h)
	const n = 24
	burst := func() (data, quic int64) {
		h.data.Store(0)
		h.quic.Store(0)
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/", nil))
				_, _ = io.Copy(io.Discard, resp.Body)
			})
		}
		h.wait(n)
		h.releaseAll()
		wg.Wait()
		return h.data.Load(), h.quic.Load()
	}
	data, quic := burst()
	t.Logf("first burst: %d requests on data connections, %d on QUIC", data, quic)
	if quic == 0 {
		t.Fatalf("all %d requests of the first burst found a data connection: the test needs a burst larger than the spares", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for conns := e.dataConns("svc"); len(conns) != 1 || conns[0] < n; conns = e.dataConns("svc") {
		if time.Now().After(deadline) {
			t.Fatalf("data connections %v after a burst of %d, want at least %d", conns, n, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if data, quic = burst(); quic != 0 {
		t.Errorf("second burst: %d requests on data connections, %d on QUIC, want all on data connections", data, quic)
	}
}

// A data connection that dies before the answer costs the visitor nothing
// when the request is safe to repeat: it is sent again. One the member may
// have acted on (a POST, a DELETE) is not, unless an idempotency key lets
// the member recognise the repeat; the visitor gets 502 instead of a
// second charge.
func TestDataConnectionLostBeforeAnswer(t *testing.T) {
	for _, tc := range []struct {
		method, key string
		wantCode    int
		wantCalls   int64
	}{
		{http.MethodGet, "", http.StatusOK, 2},
		{http.MethodHead, "", http.StatusOK, 2},
		{http.MethodPost, "", http.StatusBadGateway, 1},
		{http.MethodDelete, "", http.StatusBadGateway, 1},
		{http.MethodPost, "Idempotency-Key", http.StatusOK, 2},
		{http.MethodPatch, "X-Idempotency-Key", http.StatusOK, 2},
	} {
		t.Run(tc.method+" "+tc.key, func(t *testing.T) {
			e := startServer(t, svc)
			var calls atomic.Int64
			e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if calls.Add(1) == 1 {
					c, _, err := http.NewResponseController(w).Hijack()
					if err != nil {
						t.Errorf("hijack: %v", err)
						return
					}
					c.Close()
					return
				}
				io.WriteString(w, "second try")
			}))
			req := e.newRequest(t, t.Context(), tc.method, "/", nil)
			if tc.key != "" {
				req.Header.Set(tc.key, "k1")
			}
			resp := e.do(t, req)
			if resp.StatusCode != tc.wantCode || calls.Load() != tc.wantCalls {
				t.Fatalf("got %d after %d calls, want %d after %d", resp.StatusCode, calls.Load(), tc.wantCode, tc.wantCalls)
			}
		})
	}
}

// A data connection the member closed while it sat idle is not where a
// request that must not run twice goes: the server looks before sending
// it, instead of learning from a failure it could not retry.
func TestIdleDataConnectionClosedByMember(t *testing.T) {
	e := startServer(t, svc)
	var posts atomic.Int64
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/last" {
			// A complete keep-alive answer, then the connection goes:
			// the server pools a connection that is already closed.
			c, bw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Errorf("hijack: %v", err)
				return
			}
			bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast")
			bw.Flush()
			c.Close()
			return
		}
		posts.Add(1)
		io.WriteString(w, "posted")
	}))
	for range 5 {
		if code, body := e.get(t, "svc.example", "/last"); code != http.StatusOK || body != "last" {
			t.Fatalf("GET /last = %d %q", code, body)
		}
		time.Sleep(50 * time.Millisecond) // the close arrives
		resp := e.do(t, e.newRequest(t, t.Context(), http.MethodPost, "/charge", nil))
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || string(body) != "posted" {
			t.Fatalf("POST after the member closed an idle connection: %d %q", resp.StatusCode, body)
		}
	}
	if n := posts.Load(); n != 5 {
		t.Fatalf("member saw %d POSTs, want 5", n)
	}
}

// Data connections that go while idle (a middlebox resets them, the
// member's host closes them) are let go of once the member dials their
// replacements, not held, a descriptor each, until the next request: on a
// quiet tunnel that may be hours, as drops pile up.
func TestDroppedIdleDataConnectionsReleased(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := startServerWith(t, func(s *tunnel.Server) { s.Metrics = tunnel.NewMetrics(reg) }, svc)
	_, _, resp := e.registerRaw(t, "svc", map[string]string{protocol.MetadataData: protocol.DataHTTP1}, &quic.Config{MaxIdleTimeout: 10 * time.Second, KeepAlivePeriod: time.Second})
	e.waitMembers(t, "svc", func(n int) bool { return n == 1 })
	// dial opens the member's nth data connection, and returns once the
	// server has pooled it.
	dial := func(n int) net.Conn {
		t.Helper()
		c := dialData(t, e, resp.Metadata[protocol.MetadataData])
		deadline := time.Now().Add(5 * time.Second)
		for testutil.ToFloat64(dataConnsMetric(t, reg, "ok")) < float64(n) {
			if time.Now().After(deadline) {
				t.Fatalf("data connection %d not pooled", n)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return c
	}
	const dropped = 20
	for i := range dropped {
		dial(i + 1).Close()
	}
	dial(dropped + 1) // the replacement
	deadline := time.Now().Add(5 * time.Second)
	for got := e.dataConns("svc"); len(got) != 1 || got[0] != 1; got = e.dataConns("svc") {
		if time.Now().After(deadline) {
			t.Fatalf("data connections held after %d were dropped and one dialled: %v", dropped, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Where TCP to the tunnel port does not get through, the member notices
// and serves over QUIC.
func TestDataConnectionsUnreachable(t *testing.T) {
	e := startServerData(t, false, func(*tunnel.Server) {}, svc)
	var proto atomic.Value
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proto.Store(r.Proto)
		io.WriteString(w, "ok")
	}))
	time.Sleep(300 * time.Millisecond) // a few failed dials
	if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK || body != "ok" {
		t.Fatalf("got %d %q", code, body)
	}
	if p := proto.Load(); p != "HTTP/3.0" {
		t.Errorf("served over %v", p)
	}
	if n := e.dataConns("svc"); len(n) != 1 || n[0] != 0 {
		t.Errorf("data connections %v", n)
	}
}

// A data connection that cannot show a live member's token is closed
// without an answer, and disturbs nobody else.
func TestDataConnectionRefused(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := startServerWith(t, func(s *tunnel.Server) { s.Metrics = tunnel.NewMetrics(reg) }, svc)
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "fine") }))

	tlsConf := func(alpn string) *tls.Config {
		return &tls.Config{RootCAs: e.roots, ServerName: "localhost", NextProtos: []string{alpn}}
	}
	cases := []struct {
		name  string
		alpn  string
		hello string
	}{
		{"unknown token", protocol.DataALPN, protocol.NewDataToken() + "\n"},
		{"unterminated", protocol.DataALPN, strings.Repeat("a", protocol.DataTokenSize+1)},
		{"HTTP instead", protocol.DataALPN, "GET / HTTP/1.1\r\nHost: svc.example\r\n\r\n"},
		{"other ALPN", "h2", protocol.NewDataToken() + "\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tls.Dial("tcp", e.addr, tlsConf(tc.alpn))
			if err != nil {
				if tc.alpn != protocol.DataALPN {
					return // refused at the handshake, as well
				}
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(c, tc.hello); err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(c)
			if len(b) != 0 {
				t.Errorf("server answered %q (%v)", b, err)
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Errorf("server kept the connection open")
			}
		})
	}
	// Plain TCP garbage, no TLS at all.
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(c, "hello?\r\n\r\n")
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.ReadAll(c)
	c.Close()

	if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK || body != "fine" {
		t.Fatalf("after the refusals: %d %q", code, body)
	}
	refused := testutil.ToFloat64(dataConnsMetric(t, reg, "refused"))
	if refused < 4 {
		t.Errorf("reverst_data_connections_total{result=refused} = %v, want at least 4", refused)
	}
}

func dataConnsMetric(t *testing.T, reg *prometheus.Registry, result string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	for _, mf := range mfs {
		if mf.GetName() != "reverst_data_connections_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					c.Add(m.GetCounter().GetValue())
				}
			}
		}
	}
	return c
}

// A member that shuts down finishes the request it has on a data
// connection, while new requests go to the other member.
func TestDrainWithDataConnections(t *testing.T) {
	e := startServer(t, svc)
	started, finish := make(chan struct{}), make(chan struct{})
	var a, b atomic.Int64
	slow := &client.Server{}
	e.serveWith(t, "svc", slow, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.Add(1)
		if r.URL.Path == "/slow" {
			close(started)
			<-finish
		}
		io.WriteString(w, "a")
	}))
	slowDone := make(chan string, 1)
	go func() {
		code, body := e.get(t, "svc.example", "/slow")
		slowDone <- fmt.Sprint(code, " ", body)
	}()
	<-started
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.Add(1)
		io.WriteString(w, "b")
	}))
	shutdown := make(chan error, 1)
	go func() { shutdown <- slow.Shutdown(t.Context()) }()
	deadline := time.Now().Add(5 * time.Second)
	for !draining(e.srv) {
		if time.Now().After(deadline) {
			t.Fatal("the server never saw the drain")
		}
		time.Sleep(5 * time.Millisecond)
	}
	before := a.Load()
	for range 20 {
		if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK || body != "b" {
			t.Fatalf("during the drain: %d %q", code, body)
		}
	}
	close(finish)
	if got := <-slowDone; got != "200 a" {
		t.Errorf("the request in flight got %q", got)
	}
	if err := <-shutdown; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if a.Load() != before {
		t.Errorf("the draining member got %d new requests", a.Load()-before)
	}
}

func draining(s *tunnel.Server) bool {
	for _, g := range s.Status() {
		for _, m := range g.Members {
			if m.Draining {
				return true
			}
		}
	}
	return false
}

// A member's response header beyond the server's limit is a bad gateway,
// and the member's next answers go through.
func TestMemberHeaderLimit(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.startWith(t, func(s *tunnel.Server) { s.MaxResponseHeaderBytes = 8 << 10 }, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/huge" {
				w.Header().Set("X-Huge", strings.Repeat("h", 64<<10))
			}
			io.WriteString(w, "ok")
		}))
		if code, _ := e.get(t, "svc.example", "/huge"); code != http.StatusBadGateway {
			t.Errorf("huge header: %d, want 502", code)
		}
		for range 3 {
			if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK || body != "ok" {
				t.Fatalf("after it: %d %q", code, body)
			}
		}
	})
}

// Responses without a body (HEAD, 204, 304) and with a chunked body
// leave a data connection in step for the next request.
func TestBodylessResponsesKeepConnectionsInStep(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/204":
				w.WriteHeader(http.StatusNoContent)
			case "/304":
				w.WriteHeader(http.StatusNotModified)
			case "/chunked":
				io.WriteString(w, "one,")
				http.NewResponseController(w).Flush()
				io.WriteString(w, "two")
			default:
				w.Header().Set("Content-Length", "5")
				if r.Method != http.MethodHead {
					io.WriteString(w, "hello")
				}
			}
		}))
		for range 3 {
			for _, c := range []struct {
				method, path string
				code         int
				body         string
			}{
				{http.MethodHead, "/", 200, ""},
				{http.MethodGet, "/204", 204, ""},
				{http.MethodGet, "/304", 304, ""},
				{http.MethodGet, "/chunked", 200, "one,two"},
				{http.MethodGet, "/", 200, "hello"},
			} {
				resp := e.do(t, e.newRequest(t, t.Context(), c.method, c.path, nil))
				b, err := io.ReadAll(resp.Body)
				if err != nil || resp.StatusCode != c.code || string(b) != c.body {
					t.Fatalf("%s %s: %d %q %v, want %d %q", c.method, c.path, resp.StatusCode, b, err, c.code, c.body)
				}
				// Sent before the handler ends, the answer keeps its length.
				if c.path == "/" && (resp.ContentLength != 5 || resp.TransferEncoding != nil) {
					t.Fatalf("%s %s: length %d, transfer encoding %q; want 5, none", c.method, c.path, resp.ContentLength, resp.TransferEncoding)
				}
			}
		}
	})
}

// echoSum answers with the request's length, body and X-Sum trailer.
func echoSum(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	fmt.Fprintf(w, "%d %s %s", r.ContentLength, b, r.Trailer.Get("X-Sum"))
}

// A request body of unknown length streams to the member with its
// trailer.
func TestChunkedRequestWithTrailer(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(echoSum))
		pr, pw := io.Pipe()
		req := e.newRequest(t, t.Context(), http.MethodPost, "/", pr)
		req.Trailer = http.Header{"X-Sum": nil}
		go func() {
			for _, part := range []string{"a", "b", "c"} {
				io.WriteString(pw, part)
				time.Sleep(10 * time.Millisecond)
			}
			req.Trailer.Set("X-Sum", "abc-ok")
			pw.Close()
		}()
		resp := e.do(t, req)
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || string(b) != "-1 abc abc-ok" {
			t.Fatalf("got %d %q", resp.StatusCode, b)
		}
	})
}

// A visitor over HTTP/2 may send trailers after a body of declared length;
// HTTP/1.1, on a data connection, carries trailers only with a chunked
// body, so the request is sent chunked rather than without them.
func TestTrailersAfterSizedBody(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(echoSum))
		h2 := httptest.NewUnstartedServer(e.srv)
		h2.EnableHTTP2 = true
		h2.StartTLS()
		defer h2.Close()
		req := e.newRequest(t, t.Context(), http.MethodPost, "/", strings.NewReader("abc"))
		req.URL.Scheme, req.URL.Host, req.Host = "https", h2.Listener.Addr().String(), "svc.example"
		req.ContentLength = 3
		req.Trailer = http.Header{"X-Sum": {"abc-ok"}}
		resp, err := h2.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		const want = "-1 abc abc-ok" // the length given up for the trailer
		if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusOK || string(b) != want {
			t.Fatalf("got %s %d %q, want HTTP/2 200 %q", resp.Proto, resp.StatusCode, b, want)
		}
	})
}

// smuggled is a request hidden in a CONNECT's body.
const smuggled = "GET /smuggled HTTP/1.1\r\nHost: svc.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"

// requestLog records the requests a member got.
type requestLog struct {
	mu   sync.Mutex
	seen []string
}

func (l *requestLog) add(r *http.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seen = append(l.seen, r.Method+" "+r.URL.Path+" xff="+r.Header.Get("X-Forwarded-For"))
}

// noneSmuggled fails t if the member got the smuggled request.
func (l *requestLog) noneSmuggled(t *testing.T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.seen {
		if strings.Contains(s, "/smuggled") {
			t.Errorf("member received a smuggled request: %q", l.seen)
		}
	}
}

// A CONNECT's body (HTTP/1.1 chunked, or any HTTP/2 CONNECT stream) reaches
// the member as a body: written raw on a data connection, it would be
// parsed as requests of its own, which the frontend never saw, and their
// answers would go to the next visitors.
func TestConnectBodySmuggling(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		var log requestLog
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			log.add(r)
			if r.URL.Path == "/smuggled" {
				time.Sleep(200 * time.Millisecond)
				io.WriteString(w, "SMUGGLED")
				return
			}
			if r.Method == http.MethodConnect {
				// Answer once the request has been written whole.
				time.Sleep(50 * time.Millisecond)
			}
			io.WriteString(w, "for "+r.URL.Path)
		}))
		c := e.dialFrontend(t)
		fmt.Fprintf(c, "CONNECT svc.example:80 HTTP/1.1\r\nHost: svc.example:80\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled)
		res, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		time.Sleep(400 * time.Millisecond)
		// Each visitor after it would get the previous one's answer.
		for _, target := range []string{"/b", "/c"} {
			if code, body := e.get(t, "svc.example", target); code != http.StatusOK || body != "for "+target {
				t.Errorf("visitor asking %s got %d %q", target, code, body)
			}
		}
		log.noneSmuggled(t)
	})
}

// The same through an HTTP/2 visitor, whose CONNECT has a stream for body.
func TestConnectBodySmugglingHTTP2(t *testing.T) {
	e := startServer(t, svc)
	var log requestLog
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.add(r)
		io.WriteString(w, "for "+r.URL.Path)
	}))
	h2 := httptest.NewUnstartedServer(e.srv)
	h2.EnableHTTP2 = true
	h2.StartTLS()
	defer h2.Close()
	req, err := http.NewRequest(http.MethodConnect, "https://"+h2.Listener.Addr().String(), io.MultiReader(strings.NewReader(smuggled)))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "svc.example:443"
	res, err := h2.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(res.Body)
	res.Body.Close()
	time.Sleep(200 * time.Millisecond)
	log.noneSmuggled(t)
}

// An HTTP/1.0 visitor gets no informational response (RFC 9110 §15.2): it
// would take it for the final one.
func TestNo1xxToHTTP10Visitor(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Link", "</a.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			io.WriteString(w, "final")
		}))
		c := e.dialFrontend(t)
		io.WriteString(c, "GET / HTTP/1.0\r\nHost: svc.example\r\n\r\n")
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode != http.StatusOK || string(b) != "final" {
			t.Fatalf("HTTP/1.0 visitor read %d %q, want 200 \"final\"", res.StatusCode, b)
		}
	})
}

// holdConn passes writes through, except while hold is set: then they
// are gathered and sent in one TCP write by release.
type holdConn struct {
	net.Conn
	mu   sync.Mutex
	hold bool
	buf  bytes.Buffer
}

func (c *holdConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hold {
		return c.buf.Write(p)
	}
	return c.Conn.Write(p)
}

func (c *holdConn) release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hold = false
	_, err := c.Conn.Write(c.buf.Bytes())
	c.buf.Reset()
	return err
}

// A member that sends bytes after its answer, in a TLS record of their
// own, must not have them read as the next visitor's answer: tls.Conn
// reads ahead into its own buffer, where neither br.Buffered nor the
// read batch sees them.
func TestUnaskedBytesInTLSBufferNotReused(t *testing.T) {
	e := startServer(t, svc)
	_, _, resp := e.registerRaw(t, "svc", map[string]string{protocol.MetadataData: protocol.DataHTTP1}, &quic.Config{MaxIdleTimeout: 10 * time.Second})
	token := resp.Metadata[protocol.MetadataData]
	if token == "" {
		t.Fatal("no data token")
	}
	e.waitMembers(t, "svc", func(n int) bool { return n == 1 })
	// Two data connections, so that one is left if the first is dropped.
	for range 2 {
		raw, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		hc := &holdConn{Conn: raw}
		tc := tls.Client(hc, &tls.Config{RootCAs: e.roots, ServerName: "localhost", NextProtos: []string{protocol.DataALPN}})
		if err := protocol.WriteDataHello(tc, token); err != nil {
			t.Fatal(err)
		}
		var ok [1]byte
		if _, err := io.ReadFull(tc, ok[:]); err != nil || ok[0] != protocol.DataOK {
			t.Fatalf("data hello: %v", err)
		}
		go answerEach(func(c net.Conn, req *http.Request) {
			if req.URL.Path == "/first" {
				hc.mu.Lock()
				hc.hold = true
				hc.mu.Unlock()
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED") // a record of its own
				hc.release()
				return
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
		})(tc)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if n := e.dataConns("svc"); len(n) == 1 && n[0] == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data connections: %v", e.dataConns("svc"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, body := e.get(t, "svc.example", "/first"); code != 200 || body != "first" {
		t.Fatalf("first: %d %q", code, body)
	}
	time.Sleep(100 * time.Millisecond)
	if code, body := e.get(t, "svc.example", "/next"); body != "second" {
		t.Fatalf("next visitor got %d %q, the bytes the member sent after the first answer", code, body)
	}
}

// A member that answers at once (401, 413) without reading the upload must
// get its slot back although the visitor stalls in the middle of its body.
func TestEarlyAnswerToStalledUploadFreesSlot(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.startWith(t, func(s *tunnel.Server) {
			s.MaxRequestsPerMember = 1
			s.QueueTimeout = 2 * time.Second
		}, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost {
				http.Error(w, "no", http.StatusUnauthorized) // body left unread
				return
			}
			io.WriteString(w, "ok")
		}))
		c := e.dialFrontend(t)
		// 1 MiB announced, 1 KiB sent, then nothing.
		io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 1048576\r\n\r\n"+strings.Repeat("x", 1024))
		time.Sleep(500 * time.Millisecond)
		deadline := time.Now().Add(3 * time.Second)
		for inFlight(e.srv) != 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := inFlight(e.srv); n != 0 {
			t.Errorf("member answered, yet %d request(s) still hold its slot", n)
		}
		if code, body := e.get(t, "svc.example", "/next"); code != http.StatusOK {
			t.Fatalf("next request: %d %q", code, body)
		}
	})
}

// Connections to the data port that never say hello hold a place only up
// to a limit per host: the next one is closed at once, without a TLS
// handshake, even a member's; once they go, members' data connections are
// taken again.
func TestSilentDataConnectionsBounded(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := startServerWith(t, func(s *tunnel.Server) {
		s.Metrics = tunnel.NewMetrics(reg)
		s.RegisterTimeout = time.Minute // the silent ones stay for the whole test
	}, svc)
	_, _, resp := e.registerRaw(t, "svc", map[string]string{protocol.MetadataData: protocol.DataHTTP1}, &quic.Config{MaxIdleTimeout: 10 * time.Second})
	token := resp.Metadata[protocol.MetadataData]
	if token == "" {
		t.Fatal("no data token")
	}
	hello := func() error {
		tc, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: e.roots, ServerName: "localhost", NextProtos: []string{protocol.DataALPN}})
		if err != nil {
			return err
		}
		defer tc.Close()
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := protocol.WriteDataHello(tc, token); err != nil {
			return err
		}
		var ok [1]byte
		if _, err := io.ReadFull(tc, ok[:]); err != nil {
			return err
		}
		return nil
	}
	if err := hello(); err != nil {
		t.Fatalf("a member's data connection, before any silent one: %v", err)
	}

	silent := make([]net.Conn, tunnel.MaxPendingDataPerHost)
	for i := range silent {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		silent[i] = c
	}
	over, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	_ = over.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := over.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("connection over the limit: read %d, %v; want it closed at once", n, err)
	}
	if err := hello(); err == nil {
		t.Fatal("a data connection went through while the silent ones hold every place")
	}
	// The silent ones still wait for their hello.
	_ = silent[0].SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := silent[0].Read(make([]byte, 1)); !os.IsTimeout(err) {
		t.Fatalf("a silent connection within the limit: %v, want it kept waiting", err)
	}
	if refused := testutil.ToFloat64(dataConnsMetric(t, reg, "refused")); refused < 2 {
		t.Errorf("reverst_data_connections_total{result=refused} = %v, want at least 2", refused)
	}

	for _, c := range silent {
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := hello()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data connections still refused after the silent ones left: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
