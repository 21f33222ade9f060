package tunnel_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"net/http/httptest"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/tunnel"
)

// startUploadServer serves group svc with a member that reads each upload
// whole and answers "ok PATH", on a server whose ReceiveTimeout is a
// second.
func startUploadServer(t *testing.T, p path) *env {
	e := p.startWith(t, func(s *tunnel.Server) { s.ReceiveTimeout = time.Second }, svc)
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok "+r.URL.Path)
	}))
	return e
}

// A few hundred visitors that each announce a body and never send it do
// not shut a member that reads its uploads off from everyone: each would
// hold one of its QUIC streams (quic-go lets a peer open 100) or data
// connections (128) for good, were the body's reads not bounded by the
// ReceiveTimeout.
func TestStalledUploadsDoNotShutMemberOff(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := startUploadServer(t, p)
		addr := strings.TrimPrefix(e.frontend, "http://")
		n := 110
		if !p.quicOnly {
			n = 260
		}
		for i := range n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			fmt.Fprintf(c, "POST /upload/%d HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 10\r\n\r\nx", i)
			time.Sleep(2 * time.Millisecond) // let the member open data connections as it gets busy
		}
		time.Sleep(2 * time.Second)
		client := &http.Client{Timeout: 5 * time.Second}
		req, _ := http.NewRequest(http.MethodGet, e.frontend+"/hello", nil)
		req.Host = "svc.example"
		start := time.Now()
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("a legitimate GET while %d uploads stall: %v after %v", n, err, time.Since(start).Round(time.Millisecond))
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("GET: %d %q", res.StatusCode, body)
		}
	})
}

// Requests pipelined on one connection, with bodies of each framing, each
// reach the member once and get their own answer.
func TestPipelinedBodies(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		var log requestLog
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			log.add(r)
			b, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s %s body=%q te=%q", r.Method, r.URL.Path, b, r.TransferEncoding)
		}))
		c := e.dialFrontend(t)
		reqs := "POST /a HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 5\r\n\r\nhello" +
			"POST /b HTTP/1.1\r\nHost: svc.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" +
			"POST /c HTTP/1.1\r\nHost: svc.example\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nzz" +
			"GET /d HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 4\r\n\r\n" + smuggled[:4]
		io.WriteString(c, reqs)
		br := bufio.NewReader(c)
		want := []string{`POST /a body="hello"`, `POST /b body="abc"`, `POST /c body="zz"`, `GET /d body="GET "`}
		for _, w := range want {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			res, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode == http.StatusContinue {
				res, err = http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
			}
			b, _ := io.ReadAll(res.Body)
			if !strings.HasPrefix(string(b), w) {
				t.Errorf("got %d %q, want %q", res.StatusCode, b, w)
			}
		}
		log.noneSmuggled(t)
	})
}

// Trailer fields that RFC 9110 §6.5.1 keeps out of trailers (framing,
// routing, forwarding), or that the visitor did not announce, are not
// passed on to the member.
func TestForbiddenTrailersNotForwarded(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		got := make(chan http.Header, 1)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.ReadAll(r.Body)
			got <- r.Trailer
			io.WriteString(w, "ok")
		}))
		c := e.dialFrontend(t)
		io.WriteString(c, "POST /t HTTP/1.1\r\nHost: svc.example\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"3\r\nabc\r\n0\r\nX-Sum: 1\r\nHost: evil.example\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		tr := <-got
		if tr.Get("X-Sum") != "1" {
			t.Errorf("announced trailer lost: %v", tr)
		}
		for _, k := range []string{"Host", "Content-Length", "Transfer-Encoding", "X-Forwarded-For"} {
			if v, ok := tr[k]; ok {
				t.Errorf("member got trailer %s: %q", k, v)
			}
		}
	})
}

// An absolute-form request-target skips net/http's Host validation; one
// with a non-ASCII host, which routing would map ("ｓvc.example" to
// "svc.example") but the member would see as another host, is refused.
func TestAbsoluteFormHostMatchesRouting(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "host=%s xfh=%s", r.Host, r.Header.Get("X-Forwarded-Host"))
		}))
		c := e.dialFrontend(t)
		io.WriteString(c, "GET http://\uff53vc.example/ HTTP/1.1\r\nHost: svc.example\r\n\r\n")
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode == http.StatusOK && string(b) != "host=svc.example xfh=svc.example" {
			t.Errorf("routed to svc, but the member saw %q", b)
		}
	})
}

// The same for a trusted X-Forwarded-Host, which routes in place of the
// Host: one that is no valid host, which routing would map ("ｓvc.example"
// to "svc.example") but the member would see as another host, is refused.
func TestForwardedHostMatchesRouting(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) { s.TrustForwardedHeaders = true }, svc)
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "host=%s xfh=%s", r.Host, r.Header.Get("X-Forwarded-Host"))
	}))
	for _, xfh := range []string{"\uff53vc.example", "\uff53vc.example, svc.example"} {
		c := e.dialFrontend(t)
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: proxy.example\r\nX-Forwarded-Host: "+xfh+"\r\n\r\n")
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode != http.StatusBadRequest {
			t.Errorf("X-Forwarded-Host %q: got %d %q, want 400", xfh, res.StatusCode, b)
		}
	}
}

// h2conn opens a raw HTTP/2 connection to an h2 frontend of e.
func h2frontend(t *testing.T, e *env) string {
	h2 := httptest.NewUnstartedServer(e.srv)
	h2.EnableHTTP2 = true
	h2.StartTLS()
	t.Cleanup(h2.Close)
	return h2.Listener.Addr().String()
}

type rawH2 struct {
	c   *tls.Conn
	fr  *http2.Framer
	buf bytes.Buffer
	enc *hpack.Encoder
}

func dialH2(t *testing.T, addr string) *rawH2 {
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	io.WriteString(c, http2.ClientPreface)
	h := &rawH2{c: c, fr: http2.NewFramer(c, c)}
	h.enc = hpack.NewEncoder(&h.buf)
	h.fr.WriteSettings()
	return h
}

func (h *rawH2) headers(t *testing.T, id uint32, end bool, kv ...string) {
	h.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		h.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.buf.Bytes(), EndStream: end, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
}

// readResponse reads frames until stream id ends, returning status and body.
func (h *rawH2) readResponse(t *testing.T, id uint32) (string, string) {
	h.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	dec := hpack.NewDecoder(4096, nil)
	var status, body string
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.fr.WriteSettingsAck()
			}
		case *http2.HeadersFrame:
			fields, _ := dec.DecodeFull(f.HeaderBlockFragment())
			for _, hf := range fields {
				if hf.Name == ":status" {
					status = hf.Value
				}
			}
			if f.StreamID == id && f.StreamEnded() {
				return status, body
			}
		case *http2.DataFrame:
			if f.StreamID == id {
				body += string(f.Data())
				if f.StreamEnded() {
					return status, body
				}
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return "RST", body
			}
		case *http2.GoAwayFrame:
			return "GOAWAY " + f.ErrCode.String(), body
		}
	}
}

func TestH2AuthorityVsHost(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc, tunnel.Group{Name: "other", Hosts: []string{"other.example"}})
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "svc member: host=%q hdr=%q", r.Host, r.Header.Values("Host"))
		}))
		h := dialH2(t, h2frontend(t, e))
		const atSvc = `svc member: host="svc.example" hdr=[]`
		cases := []struct {
			kv   []string
			want string // the body's start
		}{
			// :authority routes, and is the Host the member sees.
			{[]string{":method", "GET", ":scheme", "https", ":authority", "other.example", ":path", "/", "host", "svc.example"}, "reverst: no tunnel is connected"},
			{[]string{":method", "GET", ":scheme", "https", ":authority", "svc.example", ":path", "/", "host", "other.example"}, atSvc},
			{[]string{":method", "GET", ":scheme", "https", ":path", "/", "host", "svc.example"}, atSvc},
			{[]string{":method", "GET", ":scheme", "https", ":authority", "svc.example", ":path", "/a b?x y#z"}, atSvc},
			{[]string{":method", "GET", ":scheme", "https", ":authority", "svc.example", ":path", "//x/../y"}, atSvc},
		}
		for i, c := range cases {
			id := uint32(2*i + 1)
			h.headers(t, id, true, c.kv...)
			st, body := h.readResponse(t, id)
			if !strings.HasPrefix(body, c.want) {
				t.Errorf("%q: %s %q, want %q", c.kv, st, body, c.want)
			}
		}
	})
}

// The same over one HTTP/2 connection: each stream announces a body and
// sends none; Go's HTTP/2 server lets a visitor open 250 at once.
func TestStalledUploadsOverOneH2Connection(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := startUploadServer(t, p)
		addr := h2frontend(t, e)
		h := dialH2(t, addr)
		for i := range 250 {
			h.headers(t, uint32(2*i+1), false, ":method", "POST", ":scheme", "https", ":authority", "svc.example", ":path", "/upload", "content-length", "10")
			time.Sleep(2 * time.Millisecond)
		}
		time.Sleep(2 * time.Second)
		req, _ := http.NewRequest(http.MethodGet, e.frontend+"/hello", nil)
		req.Host = "svc.example"
		res, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
		if err != nil {
			t.Fatalf("a legitimate GET while one HTTP/2 connection holds 250 stalled uploads: %v", err)
		}
		res.Body.Close()
	})
}

// Rapid reset: many streams opened and reset at once; nothing may leak.
func TestH2RapidReset(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(50 * time.Millisecond)
			io.WriteString(w, "ok")
		}))
		// The frontend's handlers, counted: Go's HTTP/2 server runs at most
		// 250 at once and queues the others, so on a busy machine a reset
		// stream's handler may start, and take a member's slot, long after
		// its frames were read.
		var active atomic.Int64
		h2 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			active.Add(1)
			defer active.Add(-1)
			e.srv.ServeHTTP(w, r)
		}))
		h2.EnableHTTP2 = true
		h2.StartTLS()
		t.Cleanup(h2.Close)
		h := dialH2(t, h2.Listener.Addr().String())
		const resets = 1000
		const last = 2*resets + 1 // a stream that is let finish after the resets
		lastDone := make(chan struct{})
		go func() { // drain
			for {
				f, err := h.fr.ReadFrame()
				if err != nil {
					return
				}
				// END_STREAM is the same bit on HEADERS and DATA.
				if f.Header().StreamID == last && f.Header().Flags.Has(http2.FlagHeadersEndStream) {
					close(lastDone)
				}
			}
		}()
		for i := range resets {
			id := uint32(2*i + 1)
			h.headers(t, id, true, ":method", "GET", ":scheme", "https", ":authority", "svc.example", ":path", "/r")
			h.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
		// The server starts queued handlers in the order of their streams:
		// once the last stream is answered, the handler of every reset one
		// has started or been dropped, and those that started give their
		// slot back as they end. A slot leaked by a reset stays counted.
		h.headers(t, last, true, ":method", "GET", ":scheme", "https", ":authority", "svc.example", ":path", "/last")
		select {
		case <-lastDone:
		case <-time.After(30 * time.Second):
			t.Fatalf("the stream opened after the resets was not answered (%d handlers active, %d requests in flight)", active.Load(), inFlight(e.srv))
		}
		deadline := time.Now().Add(20 * time.Second)
		for (active.Load() != 0 || inFlight(e.srv) != 0) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := inFlight(e.srv); n != 0 {
			t.Errorf("%d requests still in flight (%d handlers active)", n, active.Load())
		}
		for i := range 50 {
			if code, body := e.get(t, "svc.example", "/after"); code != 200 {
				t.Fatalf("request %d after the resets: %d %q", i, code, body)
			}
		}
	})
}

// Go's HTTP/2 server takes any :method a visitor sends, spaces and tabs
// included, where its HTTP/1 server takes only a token. Written on a data
// connection's request line, such a method shifts the line's fields: a
// member would read its target from the method ("GET /admin" on the line
// "GET /admin /x HTTP/1.1"), or refuse the request and drop the
// connection. The visitor gets a 400 from the server, and the member no
// such line.
func TestH2MethodNotToken(t *testing.T) {
	e := startServer(t, svc)
	lines := make(chan string, 16)
	rawDataConns(t, e, 2, func(c net.Conn) {
		// The request line as sent, then the rest of a body-less request.
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			lines <- strings.TrimSuffix(line, "\r\n")
			for line != "\r\n" {
				if line, err = br.ReadString('\n'); err != nil {
					return
				}
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	addr := h2frontend(t, e)
	for _, method := range []string{"GET /admin", "GET\t/admin", "G\u00e9T"} {
		h := dialH2(t, addr)
		h.headers(t, 1, true, ":method", method, ":scheme", "https", ":authority", "svc.example", ":path", "/x")
		if st, body := h.readResponse(t, 1); st != "400" {
			t.Errorf(":method %q: %s %q, want 400", method, st, body)
		}
	}
	for {
		select {
		case l := <-lines:
			t.Errorf("member got the request line %q", l)
		default:
			return
		}
	}
}
