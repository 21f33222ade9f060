package tunnel_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/tunnel"
)

// serve registers a member of group that serves h, and waits until it is
// registered.
func (e *env) serve(t testing.TB, group string, h http.Handler) {
	t.Helper()
	e.serveWith(t, group, &client.Server{}, h)
}

// serveWith is serve with srv, whose other fields it sets.
func (e *env) serveWith(t testing.TB, group string, srv *client.Server, h http.Handler) {
	t.Helper()
	ready := make(chan string, 1)
	srv.TunnelGroup = group
	srv.Handler = h
	srv.TLSConfig = e.clientTLS()
	srv.QUICOnly = e.quicOnly
	srv.OnConnectionReady = func(info client.ConnectionInfo) {
		select {
		case ready <- info.LocalAddr.String():
		default:
		}
	}
	var local string
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.DialAndServe(ctx, e.addr) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	select {
	case local = <-ready:
	case err := <-done:
		t.Fatalf("member ended: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("member not registered in time")
	}
	e.waitMembers(t, group, func(n int) bool { return n > 0 })
	e.waitData(t, group, local)
}

func (e *env) do(t testing.TB, req *http.Request) *http.Response {
	t.Helper()
	req.Host = "svc.example"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func (e *env) newRequest(t testing.TB, ctx context.Context, method, path string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, e.frontend+path, body)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

var svc = tunnel.Group{Name: "svc", Hosts: []string{"svc.example"}}

// Hop-by-hop request headers, and those the Connection header names, stay
// on the visitor's hop; end-to-end ones go through.
func TestHopByHopHeaders(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var names []string
			for k := range r.Header {
				names = append(names, k)
			}
			sort.Strings(names)
			// HTTP/3 has no connection-specific response headers (the
			// transport rejects them); the response side is unit-tested.
			w.Header().Set("X-Resp-End", "1")
			fmt.Fprintf(w, "headers=%s te=%q end=%q", strings.Join(names, ","), r.Header.Get("Te"), r.Header.Get("X-End"))
		}))
		req := e.newRequest(t, t.Context(), http.MethodGet, "/", nil)
		req.Header.Set("Connection", "X-Hop, keep-alive")
		req.Header.Set("X-Hop", "1")
		req.Header.Set("Keep-Alive", "timeout=5")
		req.Header.Set("Proxy-Authorization", "Basic Zm9vOmJhcg==")
		req.Header.Set("Proxy-Connection", "keep-alive")
		req.Header.Set("Te", "trailers, deflate")
		req.Header.Set("Upgrade", "h2c")
		req.Header.Set("Forwarded", "for=192.0.2.1")
		req.Header.Set("X-End", "yes")
		resp := e.do(t, req)
		b, _ := io.ReadAll(resp.Body)
		body := string(b)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		names, _, _ := strings.Cut(strings.TrimPrefix(body, "headers="), " ")
		got := map[string]bool{}
		for _, n := range strings.Split(names, ",") {
			got[n] = true
		}
		for _, gone := range []string{"Connection", "X-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Upgrade", "Forwarded"} {
			if got[gone] {
				t.Errorf("member got %s: %s", gone, body)
			}
		}
		for _, want := range []string{"X-End", "Te", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
			if !got[want] {
				t.Errorf("member lacks %s: %s", want, body)
			}
		}
		for _, want := range []string{`te="trailers"`, `end="yes"`} {
			if !strings.Contains(body, want) {
				t.Errorf("member's view %q lacks %s", body, want)
			}
		}
		if resp.Header.Get("X-Resp-End") != "1" {
			t.Errorf("response lacks X-Resp-End: %v", resp.Header)
		}
	})
}

// Response trailers reach the visitor, announced or not.
func TestResponseTrailers(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", "X-Sum")
			io.WriteString(w, "body")
			// Flushed, the body has no length: the HTTP/3 transport reads
			// trailers only after a body of unknown length.
			http.NewResponseController(w).Flush()
			w.Header().Set("X-Sum", "42")
			w.Header().Set(http.TrailerPrefix+"X-Late", "late")
		}))
		resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/", nil))
		b, err := io.ReadAll(resp.Body)
		if err != nil || string(b) != "body" {
			t.Fatalf("body %q, %v", b, err)
		}
		if got := resp.Trailer.Get("X-Sum"); got != "42" {
			t.Errorf("trailer X-Sum = %q, want 42 (trailers %v)", got, resp.Trailer)
		}
		if got := resp.Trailer.Get("X-Late"); got != "late" {
			t.Errorf("trailer X-Late = %q, want late (trailers %v)", got, resp.Trailer)
		}
	})
}

// A response of unknown length, or server-sent events, reaches the visitor
// chunk by chunk: the member does not write its second chunk before the
// visitor has read the first.
func TestStreamingResponseFlushes(t *testing.T) {
	for _, ct := range []string{"text/plain", "text/event-stream"} {
		t.Run(ct, func(t *testing.T) {
			paths(t, func(t *testing.T, p path) {
				e := p.start(t, svc)
				got := make(chan struct{})
				e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					w.Header().Set("Content-Type", ct)
					io.WriteString(w, "first\n")
					http.NewResponseController(w).Flush()
					select {
					case <-got:
					case <-r.Context().Done():
						return
					case <-time.After(5 * time.Second):
					}
					io.WriteString(w, "second\n")
				}))
				resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/", nil))
				br := bufio.NewReader(resp.Body)
				done := make(chan string, 1)
				go func() {
					line, _ := br.ReadString('\n')
					done <- line
				}()
				select {
				case line := <-done:
					if line != "first\n" {
						t.Fatalf("first chunk %q", line)
					}
				case <-time.After(3 * time.Second):
					t.Fatal("the first chunk did not arrive before the member wrote the second: the stream is buffered")
				}
				close(got)
				if rest, _ := io.ReadAll(br); string(rest) != "second\n" {
					t.Fatalf("rest %q", rest)
				}
			})
		})
	}
}

// A visitor that leaves before the answer cancels the member's request,
// is counted as 499, and frees the member's slot.
func TestVisitorCancelIs499(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		reg := prometheus.NewRegistry()
		e := p.startWith(t, func(s *tunnel.Server) { s.Metrics = tunnel.NewMetrics(reg) }, svc)
		started, cancelled := make(chan struct{}), make(chan struct{})
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(started)
			select {
			case <-r.Context().Done():
				close(cancelled)
			case <-time.After(10 * time.Second):
			}
		}))
		ctx, cancel := context.WithCancel(t.Context())
		errc := make(chan error, 1)
		go func() {
			resp, err := http.DefaultClient.Do(withHost(e.newRequest(t, ctx, http.MethodGet, "/", nil)))
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		<-started
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("visitor got %v", err)
		}
		select {
		case <-cancelled:
		case <-time.After(5 * time.Second):
			t.Fatal("the member's request was not cancelled")
		}
		const want = `
	# HELP reverst_proxied_requests_total Frontend requests by group and status class.
	# TYPE reverst_proxied_requests_total counter
	reverst_proxied_requests_total{code="4xx",group="svc"} 1
	`
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := testutil.GatherAndCompare(reg, strings.NewReader(want), "reverst_proxied_requests_total")
			if err == nil && inFlight(e.srv) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("in flight %d; metrics: %v", inFlight(e.srv), err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func withHost(req *http.Request) *http.Request {
	req.Host = "svc.example"
	return req
}

func inFlight(s *tunnel.Server) int64 {
	var n int64
	for _, g := range s.Status() {
		for _, m := range g.Members {
			n += m.InFlight
		}
	}
	return n
}

// A member that resets the request before answering gets the visitor a
// 502; one that breaks off after its header gets the visitor a cut
// response, never a complete-looking one. Either way its slot is freed.
func TestMemberFailures(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		headerSeen := make(chan struct{})
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/after" {
				io.WriteString(w, "partial")
				http.NewResponseController(w).Flush()
				// A reset overtaking the response would discard it: break off
				// only once the visitor has the header.
				select {
				case <-headerSeen:
				case <-r.Context().Done():
				}
			}
			panic(http.ErrAbortHandler)
		}))

		for _, method := range []string{http.MethodGet, http.MethodPost} {
			resp := e.do(t, e.newRequest(t, t.Context(), method, "/before", strings.NewReader("payload")))
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(b), "tunnel failed") {
				t.Errorf("%s: got %d %q, want 502", method, resp.StatusCode, b)
			}
		}

		resp := e.do(t, e.newRequest(t, t.Context(), http.MethodGet, "/after", nil))
		close(headerSeen)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if b, err := io.ReadAll(resp.Body); err == nil {
			t.Errorf("a cut response read as complete: %q", b)
		}
		deadline := time.Now().Add(5 * time.Second)
		for inFlight(e.srv) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%d requests still in flight", inFlight(e.srv))
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// A request body goes through whole, and the member's 1xx answers before
// the final one reach the visitor.
func TestRequestBodyAndEarlyHints(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			b, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fmt.Fprintf(w, "%s %d %s", r.Method, len(b), b[:3])
		}))
		for _, method := range []string{http.MethodGet, http.MethodPost} {
			var hints []string
			body := strings.Repeat("abc", 100_000)
			req := e.newRequest(t, t.Context(), method, "/", strings.NewReader(body))
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
				Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
					hints = append(hints, fmt.Sprint(code, h["Link"]))
					return nil
				},
			}))
			resp := e.do(t, req)
			b, _ := io.ReadAll(resp.Body)
			if want := fmt.Sprintf("%s %d abc", method, len(body)); resp.StatusCode != http.StatusOK || string(b) != want {
				t.Errorf("%s: got %d %q, want %q", method, resp.StatusCode, b, want)
			}
			if len(hints) != 1 || hints[0] != "103 [</style.css>; rel=preload]" {
				t.Errorf("%s: 1xx responses %q", method, hints)
			}
		}
	})
}
