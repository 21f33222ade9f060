package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/auth"
	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/internal/testlog"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// member is a client.Server registered with the test server.
type member struct {
	srv  *client.Server
	done chan error
}

// join registers a client in group that answers with its name, and waits
// until it is registered.
func (e *env) join(t testing.TB, group, name string, authn client.Authenticator) *member {
	t.Helper()
	ready := make(chan string, 1)
	m := &member{done: make(chan error, 1)}
	m.srv = &client.Server{
		TunnelGroup: group,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Member", name)
			fmt.Fprintf(w, "%s %s %s host=%s xff=%s xfh=%s xfp=%s", name, r.Method, r.URL.Path, r.Host,
				r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Host"), r.Header.Get("X-Forwarded-Proto"))
		}),
		TLSConfig:     e.clientTLS(),
		QUICOnly:      e.quicOnly,
		Authenticator: authn,
		MinBackoff:    50 * time.Millisecond,
		MaxBackoff:    200 * time.Millisecond,
		OnConnectionReady: func(info client.ConnectionInfo) {
			select {
			case ready <- info.LocalAddr.String():
			default:
			}
		},
	}
	var local string
	ctx, cancel := context.WithCancel(context.Background())
	go func() { m.done <- m.srv.DialAndServe(ctx, e.addr) }()
	t.Cleanup(func() {
		cancel()
		<-m.done
	})
	select {
	case local = <-ready:
	case err := <-m.done:
		m.done <- err
		t.Fatalf("client %s ended: %v", name, err)
	case <-time.After(5 * time.Second):
		t.Fatalf("client %s not registered in time", name)
	}
	e.waitMembers(t, group, func(int) bool { return true })
	e.waitData(t, group, local)
	return m
}

// register runs a client that is expected to be refused and returns its
// error.
func (e *env) register(t testing.TB, group string, authn client.Authenticator) error {
	t.Helper()
	srv := &client.Server{TunnelGroup: group, TLSConfig: e.clientTLS(), Authenticator: authn, Handler: http.NotFoundHandler(), Logger: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.DialAndServe(ctx, e.addr)
}

func (e *env) waitMembers(t testing.TB, group string, ok func(int) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok(e.srv.Members()[group]) {
		if time.Now().After(deadline) {
			t.Fatalf("group %s has %d members", group, e.srv.Members()[group])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// samePort compares the ports of two addresses: the client's local address
// is its socket's wildcard one.
func samePort(a, b string) bool {
	_, pa, _ := net.SplitHostPort(a)
	_, pb, _ := net.SplitHostPort(b)
	return pa == pb
}

// waitData waits, unless members stay on QUIC or cannot reach the data
// port, until the member of group
// whose local address is remote has its spare data connections, so that
// requests take them.
func (e *env) waitData(t testing.TB, group, remote string) {
	t.Helper()
	if e.quicOnly || !samePort(e.addr, e.dataAddr) {
		return
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ready := false
		for _, g := range e.srv.Status() {
			for _, m := range g.Members {
				ready = ready || g.Name == group && samePort(m.RemoteAddr, remote) && m.DataConns >= 2
			}
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s: members without data connections: %+v", group, e.srv.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRequestThroughTunnel(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.join(t, "svc", "a", nil)
		code, body := e.get(t, "SVC.example:8181", "/fo")
		if code != http.StatusOK {
			t.Fatalf("got %d %q", code, body)
		}
		for _, want := range []string{"a GET /fo", "host=SVC.example:8181", "xff=127.0.0.1", "xfh=SVC.example:8181", "xfp=http"} {
			if !strings.Contains(body, want) {
				t.Errorf("body %q lacks %q", body, want)
			}
		}
	})
}

// At debug level the server writes one line per request, as an access
// log, without the query string, which may hold a visitor's secret.
func TestDebugAccessLine(t *testing.T) {
	log, logs := testlog.Debug()
	e := startServerWith(t, func(s *tunnel.Server) { s.Logger = log }, svc)
	e.join(t, "svc", "a", nil)
	if code, body := e.get(t, "svc.example", "/fo?access_token=s3cret"); code != http.StatusOK {
		t.Fatalf("got %d %q", code, body)
	}
	if code, _ := e.get(t, "nobody.example", "/x"); code != http.StatusBadGateway {
		t.Fatalf("unknown host: %d", code)
	}
	var lines []string
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, "msg=request ") {
			lines = append(lines, line)
		}
		if strings.Contains(line, "s3cret") {
			t.Errorf("the log has the query string: %s", line)
		}
	}
	if len(lines) != 2 {
		t.Fatalf("%d access lines, want 2:\n%s", len(lines), logs.String())
	}
	for i, want := range [][]string{
		{"group=svc", "method=GET", "host=svc.example", "path=/fo", "status=200", "duration=", "remote=127.0.0.1:"},
		{`group=""`, "host=nobody.example", "path=/x", "status=502"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("access line %q lacks %q", lines[i], w)
			}
		}
	}
}

func TestRequestsSpreadOverMembers(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.join(t, "svc", "a", nil)
		e.join(t, "svc", "b", nil)
		e.waitMembers(t, "svc", func(n int) bool { return n == 2 })
		seen := map[string]int{}
		for range 20 {
			code, body := e.get(t, "svc.example", "/")
			if code != http.StatusOK {
				t.Fatalf("got %d %q", code, body)
			}
			seen[strings.Fields(body)[0]]++
		}
		if seen["a"] < 5 || seen["b"] < 5 {
			t.Fatalf("requests not spread: %v", seen)
		}
	})
}

func TestMemberLeavesGroup(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		a := e.join(t, "svc", "a", nil)
		e.join(t, "svc", "b", nil)
		e.waitMembers(t, "svc", func(n int) bool { return n == 2 })
		if err := a.srv.Close(); err != nil {
			t.Fatal(err)
		}
		e.waitMembers(t, "svc", func(n int) bool { return n == 1 })
		for range 10 {
			code, body := e.get(t, "svc.example", "/")
			if code != http.StatusOK || !strings.HasPrefix(body, "b ") {
				t.Fatalf("after a left: got %d %q", code, body)
			}
		}
	})
}

func TestRegistrationErrors(t *testing.T) {
	authn, err := (&auth.Factory{}).New(groups.Authentication{Basic: &groups.Basic{Username: "user", Password: "pass"}})
	if err != nil {
		t.Fatal(err)
	}
	e := startServer(t, tunnel.Group{Name: "svc", Hosts: []string{"svc.example"}, Auth: authn})
	tests := []struct {
		name  string
		group string
		authn client.Authenticator
		want  error
	}{
		{"wrong password", "svc", client.BasicAuthenticator("user", "nope"), client.ErrUnauthorized},
		{"no credentials", "svc", nil, client.ErrUnauthorized},
		{"wrong scheme", "svc", client.BearerAuthenticator("pass"), client.ErrUnauthorized},
		{"unknown group", "other", client.BasicAuthenticator("user", "pass"), client.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			if err := e.register(t, tt.group, tt.authn); !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("refusal took %s; the client must not retry it", d)
			}
		})
	}
	e.join(t, "svc", "a", client.BasicAuthenticator("user", "pass"))
	if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK {
		t.Fatalf("good credentials: got %d %q", code, body)
	}
}

// An authenticator slower than the server's registration timeout costs
// one attempt at most, not the tunnel: it runs before the dial.
func TestSlowAuthenticator(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "g", Hosts: []string{"g.example"}}) // RegisterTimeout 500ms
	var slowed atomic.Bool
	registered := make(chan struct{}, 1)
	srv := &client.Server{
		TunnelGroup: "g", Handler: http.NotFoundHandler(), TLSConfig: e.clientTLS(), QUICOnly: true,
		Authenticator: client.AuthenticatorFunc(func(ctx context.Context, req *protocol.RegisterRequest) error {
			if !slowed.Swap(true) {
				time.Sleep(time.Second) // the identity provider is slow, once
			}
			req.Metadata["Authorization"] = "Bearer fresh"
			return nil
		}),
		OnConnectionReady: func(client.ConnectionInfo) {
			select {
			case registered <- struct{}{}:
			default:
			}
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.DialAndServe(ctx, e.addr) }()
	select {
	case <-registered:
		cancel()
		<-done
	case err := <-done:
		if errors.Is(err, client.ErrBadRequest) {
			t.Fatalf("DialAndServe gave up for good: %v", err)
		}
		t.Fatal(err)
	}
}

// 4. After a refused upgrade, the next request on the visitor's connection
// must not reach the member of another group.

func TestReloadKeepsMembersAndMovesHosts(t *testing.T) {
	e := startServer(t,
		tunnel.Group{Name: "keep", Hosts: []string{"keep.example"}},
		tunnel.Group{Name: "gone", Hosts: []string{"gone.example"}},
	)
	e.join(t, "keep", "k", nil)
	g := e.join(t, "gone", "g", nil)

	err := e.srv.SetGroups([]tunnel.Group{
		{Name: "keep", Hosts: []string{"new.example"}},
		{Name: "added", Hosts: []string{"added.example"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if code, body := e.get(t, "new.example", "/"); code != http.StatusOK || !strings.HasPrefix(body, "k ") {
		t.Fatalf("moved host: got %d %q", code, body)
	}
	if code, _ := e.get(t, "keep.example", "/"); code != http.StatusBadGateway {
		t.Fatalf("old host: got %d, want 502", code)
	}
	if code, _ := e.get(t, "added.example", "/"); code != http.StatusServiceUnavailable {
		t.Fatalf("added group: got %d, want 503", code)
	}
	if code, _ := e.get(t, "gone.example", "/"); code != http.StatusBadGateway {
		t.Fatalf("removed group: got %d, want 502", code)
	}
	// The removed group's member was disconnected; it reconnects and is
	// told the group does not exist.
	select {
	case err := <-g.done:
		if !errors.Is(err, client.ErrNotFound) {
			t.Fatalf("member of removed group ended with %v, want ErrNotFound", err)
		}
		g.done <- err
	case <-time.After(5 * time.Second):
		t.Fatal("member of removed group still running")
	}

	if err := e.srv.SetGroups([]tunnel.Group{
		{Name: "a", Hosts: []string{"x.example"}},
		{Name: "b", Hosts: []string{"X.example"}},
	}); err == nil {
		t.Fatal("duplicate host accepted")
	}
	if code, _ := e.get(t, "new.example", "/"); code != http.StatusOK {
		t.Fatalf("a rejected reload changed routing: %d", code)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := startServerWith(t, func(s *tunnel.Server) { s.Metrics = tunnel.NewMetrics(reg) }, svc)
	e.join(t, "svc", "a", nil)
	for range 3 {
		e.get(t, "svc.example", "/")
	}
	e.get(t, "nobody.example", "/")
	if err := e.register(t, "nope", nil); !errors.Is(err, client.ErrNotFound) {
		t.Fatal(err)
	}
	const want = `
# HELP reverst_group_members Registered tunnel connections per group.
# TYPE reverst_group_members gauge
reverst_group_members{group="svc"} 1
# HELP reverst_proxied_requests_total Frontend requests by group and status class.
# TYPE reverst_proxied_requests_total counter
reverst_proxied_requests_total{code="2xx",group="svc"} 3
reverst_proxied_requests_total{code="5xx",group=""} 1
# HELP reverst_registrations_total Tunnel registrations by group and result (ok, unauthorized, not_found, bad_request, timeout, rate_limited, error).
# TYPE reverst_registrations_total counter
reverst_registrations_total{group="",result="not_found"} 1
reverst_registrations_total{group="svc",result="ok"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "reverst_group_members", "reverst_proxied_requests_total", "reverst_registrations_total"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(reg, "reverst_request_duration_seconds"); n != 2 {
		t.Fatalf("latency series: %d, want 2", n)
	}
}

// A reload that removes a group takes its series with it, those of
// requests still in flight on it included: groups that come and go (one
// per preview environment, say) must not grow the metrics for good.
func TestRemovedGroupLeavesNoSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	gone := tunnel.Group{Name: "gone", Hosts: []string{"gone.example"}}
	e := startServerWith(t, func(s *tunnel.Server) { s.Metrics = tunnel.NewMetrics(reg) }, svc, gone)
	e.join(t, "svc", "a", nil)
	held := make(chan struct{}, 1)
	e.serve(t, "gone", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			held <- struct{}{}
			<-r.Context().Done()
			return
		}
		io.WriteString(w, "ok")
	}))
	for _, host := range []string{"svc.example", "gone.example"} {
		if code, body := e.get(t, host, "/"); code != http.StatusOK {
			t.Fatalf("%s: got %d %q", host, code, body)
		}
	}
	// A request still in flight when the group goes ends after its series
	// were deleted.
	ended := make(chan int, 1)
	go func() {
		code, _ := e.get(t, "gone.example", "/hold")
		ended <- code
	}()
	<-held
	if err := e.srv.SetGroups([]tunnel.Group{svc}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the request in flight on the removed group did not end")
	}

	series := func(group string) []string {
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, mf := range families {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "group" && l.GetValue() == group {
						out = append(out, mf.GetName())
					}
				}
			}
		}
		return out
	}
	if got := series("gone"); len(got) > 0 {
		t.Errorf("series of the removed group remain: %v", got)
	}
	// The kept group keeps its own.
	if got := series("svc"); len(got) < 3 {
		t.Errorf("series of the kept group: %v", got)
	}
}

func TestConcurrentRequests(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.start(t, svc)
		e.join(t, "svc", "a", nil)
		e.join(t, "svc", "b", nil)
		var wg sync.WaitGroup
		errs := make(chan error, 200)
		for i := range 200 {
			wg.Go(func() {
				req, _ := http.NewRequest(http.MethodGet, e.frontend+fmt.Sprintf("/%d", i), nil)
				req.Host = "svc.example"
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					errs <- err
					return
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					errs <- fmt.Errorf("status %d", resp.StatusCode)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

func TestWildcardHosts(t *testing.T) {
	e := startServer(t,
		tunnel.Group{Name: "wild", Hosts: []string{"*.example.com"}},
		tunnel.Group{Name: "deeper", Hosts: []string{"*.api.example.com"}},
		tunnel.Group{Name: "exact", Hosts: []string{"www.example.com", "bücher.example"}},
		tunnel.Group{Name: "wild-idn", Hosts: []string{"*.Straße.example"}},
	)
	e.join(t, "wild", "wild", nil)
	e.join(t, "deeper", "deeper", nil)
	e.join(t, "exact", "exact", nil)
	e.join(t, "wild-idn", "wild-idn", nil)
	tests := []struct{ host, want string }{
		{"a.example.com", "wild"},
		{"a.b.example.com", "wild"},
		{"v1.api.example.com", "deeper"},
		{"api.example.com", "wild"},
		{"WWW.example.com:80", "exact"},
		{"xn--bcher-kva.example", "exact"},
		{"shop.xn--strae-oqa.example", "wild-idn"},
		{"example.com", ""},
		{"other.com", ""},
	}
	for _, tt := range tests {
		code, body := e.get(t, tt.host, "/")
		if tt.want == "" {
			if code != http.StatusBadGateway {
				t.Errorf("%s: got %d %q, want 502", tt.host, code, body)
			}
			continue
		}
		if code != http.StatusOK || !strings.HasPrefix(body, tt.want+" ") {
			t.Errorf("%s: got %d %q, want group %s", tt.host, code, body, tt.want)
		}
	}
}

func TestForwardedHeaders(t *testing.T) {
	for _, trust := range []bool{false, true} {
		t.Run(fmt.Sprintf("trust=%v", trust), func(t *testing.T) {
			e := startServerWith(t, func(s *tunnel.Server) { s.TrustForwardedHeaders = trust },
				svc, tunnel.Group{Name: "front", Hosts: []string{"front.example"}})
			e.join(t, "svc", "svc", nil)
			e.join(t, "front", "front", nil)
			req, _ := http.NewRequest(http.MethodGet, e.frontend+"/", nil)
			req.Host = "front.example"
			req.Header.Set("X-Forwarded-Host", "svc.example")
			req.Header.Set("X-Forwarded-For", "203.0.113.7")
			req.Header.Set("X-Forwarded-Proto", "https")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			body := string(b)
			want := []string{"front ", "xff=127.0.0.1 ", "xfh=front.example", "xfp=http"}
			if trust {
				want = []string{"svc ", "xff=203.0.113.7, 127.0.0.1", "xfh=svc.example", "xfp=https"}
			}
			for _, w := range want {
				if !strings.Contains(body, w) {
					t.Errorf("body %q lacks %q", body, w)
				}
			}
		})
	}
}

func TestMemberRequestLimit(t *testing.T) {
	paths(t, func(t *testing.T, p path) {
		e := p.startWith(t, func(s *tunnel.Server) {
			s.MaxRequestsPerMember = 2
			s.QueueTimeout = 300 * time.Millisecond
		}, svc)
		release := make(chan struct{})
		ready := make(chan struct{}, 1)
		srv := &client.Server{
			TunnelGroup: "svc",
			TLSConfig:   e.clientTLS(),
			Logger:      slog.New(slog.DiscardHandler),
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/slow" {
					<-release
				}
				fmt.Fprint(w, "done")
			}),
			OnConnectionReady: func(client.ConnectionInfo) { ready <- struct{}{} },
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() { _ = srv.DialAndServe(ctx, e.addr) }()
		<-ready
		e.waitMembers(t, "svc", func(n int) bool { return n == 1 })

		results := make(chan int, 3)
		for range 3 {
			go func() {
				code, _ := e.get(t, "svc.example", "/slow")
				results <- code
			}()
		}
		// Two are in flight, the third queues; with nothing freeing up, a
		// fourth request times out in the queue.
		time.Sleep(100 * time.Millisecond)
		start := time.Now()
		code, body := e.get(t, "svc.example", "/fast")
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "busy") {
			t.Fatalf("over the limit: got %d %q, want 503 busy", code, body)
		}
		if d := time.Since(start); d < 250*time.Millisecond {
			t.Fatalf("answered after %s, before the queue timeout", d)
		}
		close(release)
		got := map[int]int{}
		for range 3 {
			got[<-results]++
		}
		// The queued request got a slot when the first two finished, or timed
		// out while they were held: either way none failed otherwise.
		if got[http.StatusOK]+got[http.StatusServiceUnavailable] != 3 || got[http.StatusOK] < 2 {
			t.Fatalf("slow requests: %v", got)
		}
	})
}

// In a group large enough to be balanced by sampling two members, a
// request goes to a member below its limit while there is one, rather
// than queueing behind the two it sampled.
func TestMemberRequestLimitLargeGroup(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.MaxRequestsPerMember = 1
		s.QueueTimeout = 2 * time.Second
	}, svc)
	const members = 9
	release := make(chan struct{})
	held := make(chan struct{}, members)
	for i := range members {
		name := fmt.Sprint(i)
		e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/hold" {
				held <- struct{}{}
				<-release
			}
			io.WriteString(w, name)
		}))
	}
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	defer free()
	holds := make(chan error, members)
	for range members - 1 {
		go func() {
			req, _ := http.NewRequest(http.MethodGet, e.frontend+"/hold", nil)
			req.Host = "svc.example"
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			holds <- err
		}()
	}
	for range members - 1 {
		select {
		case <-held:
		case <-time.After(5 * time.Second):
			t.Fatal("the held requests did not each find a free member")
		}
	}
	// One member is free; every request must find it at once.
	start := time.Now()
	for i := range 20 {
		if code, body := e.get(t, "svc.example", "/"); code != http.StatusOK {
			t.Fatalf("request %d with one member free: %d %q", i, code, body)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("20 requests took %v: they queued although a member was free", d)
	}
	free()
	for range members - 1 {
		if err := <-holds; err != nil {
			t.Errorf("held request: %v", err)
		}
	}
}

// fillMember serves group svc with a member that holds each request until
// the test ends, and keeps it busy with one.
func (e *env) fillMember(t *testing.T) {
	release, held := make(chan struct{}), make(chan struct{}, 1)
	t.Cleanup(func() { close(release) })
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { held <- struct{}{}; <-release }))
	go func() {
		req, _ := http.NewRequest(http.MethodGet, e.frontend+"/hold", nil)
		req.Host = "svc.example"
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	<-held
}

// A request queued behind full members takes a member that joins while it
// waits (scaling out under load).
func TestQueuedRequestTakesNewMember(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.MaxRequestsPerMember = 1
		s.QueueTimeout = 3 * time.Second
	}, svc)
	e.fillMember(t)
	type result struct {
		code int
		body string
		took time.Duration
	}
	queued := make(chan result, 1)
	go func() {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodGet, e.frontend+"/queued", nil)
		req.Host = "svc.example"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			queued <- result{0, err.Error(), time.Since(start)}
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		queued <- result{resp.StatusCode, string(body), time.Since(start)}
	}()
	time.Sleep(200 * time.Millisecond) // it is in the queue
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "new member") }))
	if r := <-queued; r.code != http.StatusOK || r.took > 1500*time.Millisecond {
		t.Fatalf("queued request: %d %q after %v; want 200 from the new member", r.code, r.body, r.took)
	}
}

// 3. A slow client Authenticator (token fetch) is retried, not "bad request" for good.

// A visitor that stops reading its response loses it after the
// SendTimeout, and its member's request slot goes to the next request.
func TestVisitorThatStopsReading(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.MaxRequestsPerMember = 1
		s.QueueTimeout = 5 * time.Second
		s.SendTimeout = 300 * time.Millisecond
	}, svc)
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/endless" {
			io.WriteString(w, "ok")
			return
		}
		for {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	c := e.dialFrontend(t)
	_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
	io.WriteString(c, "GET /endless HTTP/1.1\r\nHost: svc.example\r\n\r\n")
	if _, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil {
		t.Fatal(err)
	}
	// The visitor reads no further; the member's one slot is taken.
	start := time.Now()
	if code, body := e.get(t, "svc.example", "/next"); code != http.StatusOK || body != "ok" {
		t.Fatalf("next request: %d %q after %v", code, body, time.Since(start))
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("next request waited %v for the slot", d)
	}
}

func TestRegistrationRateLimit(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.RegistrationRate = 0.5
		s.RegistrationBurst = 2
	}, svc)
	var limited int
	for range 4 {
		// Over its limit, a validated address is refused before the
		// TLS handshake.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := quic.DialAddr(ctx, e.addr, e.clientTLS(), &quic.Config{})
		cancel()
		var te *quic.TransportError
		if errors.As(err, &te) && te.ErrorCode == quic.ConnectionRefused {
			limited++
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		defer conn.CloseWithError(0, "")
		str, err := conn.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		_ = protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: "svc"})
		if _, err := protocol.ReadResponse(str); err != nil {
			var appErr *quic.ApplicationError
			if errors.As(err, &appErr) && appErr.ErrorCode == protocol.CodeServerError && appErr.ErrorMessage == "too many registrations" {
				limited++
				continue
			}
			t.Fatalf("unexpected registration error: %v", err)
		}
	}
	if limited != 2 {
		t.Fatalf("%d of 4 registrations limited, want 2 (burst 2)", limited)
	}
}

// Reloads that add, change and remove other groups fail none of the
// requests flowing through a kept group.
func TestReloadUnderLoad(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "steady", Hosts: []string{"steady.example"}}, tunnel.Group{Name: "x0", Hosts: []string{"x0.example"}})
	e.join(t, "steady", "s1", nil)
	e.join(t, "steady", "s2", nil)
	e.join(t, "x0", "x", nil)
	stop := make(chan struct{})
	var sent, failed atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodGet, e.frontend+"/", nil)
				req.Host = "steady.example"
				resp, err := http.DefaultClient.Do(req)
				sent.Add(1)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
			}
		})
	}
	for i := range 50 {
		defs := []tunnel.Group{{Name: "steady", Hosts: []string{"steady.example", fmt.Sprintf("alias%d.example", i)}}}
		if i%2 == 0 {
			defs = append(defs, tunnel.Group{Name: fmt.Sprintf("x%d", i), Hosts: []string{fmt.Sprintf("x%d.example", i)}})
		}
		if err := e.srv.SetGroups(defs); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("requests sent %d, failed %d", sent.Load(), failed.Load())
	if failed.Load() != 0 || sent.Load() < 100 {
		t.Fatalf("sent %d, failed %d", sent.Load(), failed.Load())
	}
}
