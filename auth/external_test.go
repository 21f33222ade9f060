package auth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/reverst-dev/reverst/groups"
)

// authServer is a real HTTP auth endpoint whose answer tests change.
type authServer struct {
	*httptest.Server
	calls  atomic.Int64
	conns  atomic.Int64 // connections opened to the endpoint
	status atomic.Int64 // answer for every call; see handle
	// block, when set, holds each call until it is closed or the
	// request is cancelled; entered receives a value as a call starts.
	block   chan struct{}
	entered chan struct{}
	mu      sync.Mutex
	seen    []string // Authorization values received
}

func newAuthServer(t *testing.T, status int) *authServer {
	t.Helper()
	s := &authServer{entered: make(chan struct{}, 1000)}
	s.status.Store(int64(status))
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.handle))
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.conns.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *authServer) handle(w http.ResponseWriter, r *http.Request) {
	s.calls.Add(1)
	s.mu.Lock()
	s.seen = append(s.seen, r.Header.Get("Authorization"))
	block := s.block
	s.mu.Unlock()
	s.entered <- struct{}{}
	if block != nil {
		select {
		case <-block:
		case <-r.Context().Done():
			return
		}
	}
	w.WriteHeader(int(s.status.Load()))
}

func (s *authServer) setBlock(ch chan struct{}) {
	s.mu.Lock()
	s.block = ch
	s.mu.Unlock()
}

// clock is a fake time source for cache expiry.
type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }
func newClock() *clock                   { c := &clock{}; c.ns.Store(time.Now().UnixNano()); return c }
func externalAuth(url string) groups.Authentication {
	return groups.Authentication{External: &groups.External{Endpoint: url}}
}

func newExternalAuth(t *testing.T, f *Factory, url string) Authenticator {
	t.Helper()
	a, err := f.New(externalAuth(url))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func expect(t *testing.T, a Authenticator, auth string, want outcome) error {
	t.Helper()
	err := a.Authenticate(t.Context(), md(auth))
	if got := outcomeOf(err); got != want {
		t.Fatalf("%s: got %v (%v), want %v", auth, got, err, want)
	}
	return err
}

func TestExternalAnswers(t *testing.T) {
	other := newAuthServer(t, http.StatusOK)
	tests := []struct {
		status int
		want   outcome
	}{
		{http.StatusOK, allow},
		{http.StatusUnauthorized, deny},
		{http.StatusForbidden, deny},
		{http.StatusNoContent, deny},
		{http.StatusBadRequest, deny},
		{http.StatusNotFound, deny},
		{http.StatusRequestTimeout, fail},
		{http.StatusTooManyRequests, fail},
		{http.StatusInternalServerError, fail},
		{http.StatusBadGateway, fail},
		{http.StatusServiceUnavailable, fail},
	}
	for _, tt := range tests {
		t.Run(http.StatusText(tt.status), func(t *testing.T) {
			s := newAuthServer(t, tt.status)
			a := newExternalAuth(t, &Factory{}, s.URL)
			expect(t, a, "Bearer tok", tt.want)
			if got := s.calls.Load(); got != 1 {
				t.Fatalf("endpoint called %d times", got)
			}
			if s.seen[0] != "Bearer tok" {
				t.Fatalf("endpoint got Authorization %q", s.seen[0])
			}
		})
	}
	t.Run("redirect", func(t *testing.T) {
		s := httptest.NewServer(http.RedirectHandler(other.URL, http.StatusFound))
		defer s.Close()
		a := newExternalAuth(t, &Factory{}, s.URL)
		expect(t, a, "Bearer tok", fail)
		if n := other.calls.Load(); n != 0 {
			t.Fatalf("redirect followed: target called %d times", n)
		}
	})
}

func TestExternalMalformedCredentials(t *testing.T) {
	// Credentials that cannot be sent as an HTTP header value are the
	// client's fault: denied without a call, not a server error that
	// tells the client to retry (and counts as an endpoint failure).
	reg := prometheus.NewRegistry()
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, &Factory{Registerer: reg}, s.URL)
	for _, cred := range []string{"Bearer a\nb", "Bearer a\rb", "Bearer a\x00b", "Bearer a\x7fb"} {
		expect(t, a, cred, deny)
	}
	if n := s.calls.Load(); n != 0 {
		t.Fatalf("endpoint called %d times", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == "reverst_auth_external_requests_total" && value(m) != 0 {
				t.Fatalf("endpoint calls counted: %v", m)
			}
		}
	}
	// A tab and bytes beyond ASCII are valid in a header value: asked.
	expect(t, a, "Bearer a\tb", allow)
	expect(t, a, "Bearer \u00e9", allow)
}

func TestExternalSchemeAsPresented(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	a, err := (&Factory{}).New(groups.Authentication{External: &groups.External{Scheme: "JWT", Endpoint: s.URL}})
	if err != nil {
		t.Fatal(err)
	}
	expect(t, a, "jwt a.b.c", allow)
	expect(t, a, "Bearer a.b.c", deny) // not the group's scheme: no call
	if len(s.seen) != 1 || s.seen[0] != "jwt a.b.c" {
		t.Fatalf("endpoint got %q", s.seen)
	}
}

func TestExternalSlow(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	s.setBlock(make(chan struct{})) // never released: every call times out
	f := &Factory{ExternalTimeout: 50 * time.Millisecond}
	a := newExternalAuth(t, f, s.URL)
	start := time.Now()
	err := expect(t, a, "Bearer tok", fail)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want a deadline error, got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("timed out after %v", d)
	}
	// Not cached: the next registration asks again.
	expect(t, a, "Bearer tok", fail)
	if n := s.calls.Load(); n != 2 {
		t.Fatalf("endpoint called %d times, want 2", n)
	}
}

func TestExternalCallerDeadline(t *testing.T) {
	// The registration's own deadline bounds the wait even when the
	// per-call timeout is longer.
	s := newAuthServer(t, http.StatusOK)
	release := make(chan struct{})
	s.setBlock(release)
	defer close(release)
	a := newExternalAuth(t, &Factory{ExternalTimeout: time.Minute}, s.URL)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	err := a.Authenticate(ctx, md("Bearer tok"))
	if outcomeOf(err) != fail || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want a deadline error", err)
	}
}

func TestExternalDown(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	s.Close()
	a := newExternalAuth(t, &Factory{}, s.URL)
	expect(t, a, "Bearer tok", fail)
}

func TestExternalFlapping(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, &Factory{}, s.URL)
	steps := []struct {
		status int
		tok    string
		want   outcome
		calls  int64
	}{
		{http.StatusServiceUnavailable, "t1", fail, 1},
		{http.StatusInternalServerError, "t1", fail, 2}, // errors are not cached
		{http.StatusOK, "t1", allow, 3},
		{http.StatusServiceUnavailable, "t1", allow, 3}, // cached allow
		{http.StatusServiceUnavailable, "t2", fail, 4},
		{http.StatusForbidden, "t2", deny, 5},
		{http.StatusOK, "t2", deny, 5}, // cached deny
		{http.StatusBadGateway, "t3", fail, 6},
		{http.StatusOK, "t3", allow, 7},
	}
	for i, st := range steps {
		s.status.Store(int64(st.status))
		if got := outcomeOf(a.Authenticate(t.Context(), md("Bearer "+st.tok))); got != st.want {
			t.Fatalf("step %d: got %v, want %v", i, got, st.want)
		}
		if n := s.calls.Load(); n != st.calls {
			t.Fatalf("step %d: %d calls, want %d", i, n, st.calls)
		}
	}
}

func TestExternalCacheTTL(t *testing.T) {
	clk := newClock()
	f := &Factory{CacheAllowTTL: time.Minute, CacheDenyTTL: 10 * time.Second, now: clk.now}
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, f, s.URL)

	expect(t, a, "Bearer good", allow)
	s.status.Store(http.StatusUnauthorized)
	expect(t, a, "Bearer bad", deny)

	// Endpoint answers the other way now: cached decisions stand.
	s.status.Store(http.StatusOK)
	clk.advance(9 * time.Second)
	expect(t, a, "Bearer bad", deny)
	if n := s.calls.Load(); n != 2 {
		t.Fatalf("cached deny retried: %d calls", n)
	}
	// Deny TTL over: asked again, now allowed.
	clk.advance(2 * time.Second)
	expect(t, a, "Bearer bad", allow)
	if n := s.calls.Load(); n != 3 {
		t.Fatalf("%d calls, want 3", n)
	}

	// Allow survives the endpoint going down until its TTL.
	s.Close()
	expect(t, a, "Bearer good", allow)
	clk.advance(48 * time.Second) // 59s after the allow
	expect(t, a, "Bearer good", allow)
	clk.advance(2 * time.Second)
	expect(t, a, "Bearer good", fail)
}

func TestExternalCacheDisabled(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, &Factory{CacheSize: -1}, s.URL)
	expect(t, a, "Bearer tok", allow)
	expect(t, a, "Bearer tok", allow)
	if n := s.calls.Load(); n != 2 {
		t.Fatalf("%d calls, want 2", n)
	}
}

func TestExternalConcurrentOneCall(t *testing.T) {
	s := newAuthServer(t, http.StatusOK)
	release := make(chan struct{})
	s.setBlock(release)
	a := newExternalAuth(t, &Factory{}, s.URL)

	wait := authenticateAtOnce(t, a, slices.Repeat([]string{"Bearer shared"}, 100)...)
	<-s.entered // the one call is in flight; hold it while the rest arrive
	close(release)
	wait()
	if got := s.calls.Load(); got != 1 {
		t.Fatalf("%d endpoint calls, want 1", got)
	}
}

// authenticateAtOnce starts one Authenticate per credential and returns a
// function that waits for them all, failing the test on any error.
func authenticateAtOnce(t *testing.T, a Authenticator, creds ...string) (wait func()) {
	errs := make(chan error, len(creds))
	for _, c := range creds {
		go func() { errs <- a.Authenticate(t.Context(), md(c)) }()
	}
	return func() {
		t.Helper()
		for range creds {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	}
}

// tokens returns n distinct bearer credentials.
func tokens(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("Bearer %s-%d", prefix, i)
	}
	return out
}

func TestExternalDenialsDoNotEvictAllows(t *testing.T) {
	// A flood of bad tokens must not push the good ones out of the cache:
	// each legitimate member would cost the endpoint a call again.
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.Header.Get("Authorization") != "Bearer good" {
			w.WriteHeader(http.StatusForbidden)
		}
	}))
	t.Cleanup(srv.Close)
	a := newExternalAuth(t, &Factory{CacheSize: 8}, srv.URL)
	expect(t, a, "Bearer good", allow)
	for _, bad := range tokens("bad", 100) {
		expect(t, a, bad, deny)
	}
	before := calls.Load()
	expect(t, a, "Bearer good", allow)
	if n := calls.Load() - before; n != 0 {
		t.Fatalf("the allowed token cost %d more calls after 100 denied ones, want 0", n)
	}
}

func TestExternalConcurrentCallsCapped(t *testing.T) {
	// Registrations with distinct credentials from many addresses must
	// not open an unbounded number of calls (and connections) at once.
	s := newAuthServer(t, http.StatusOK)
	release := make(chan struct{})
	s.setBlock(release)
	a := newExternalAuth(t, &Factory{}, s.URL)

	const n = maxExternalCalls + 36
	wait := authenticateAtOnce(t, a, tokens("tok", n)...)
	for range maxExternalCalls {
		<-s.entered
	}
	select {
	case <-s.entered:
		t.Fatalf("more than %d calls in flight at once", maxExternalCalls)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	wait()
	if got := s.calls.Load(); got != n {
		t.Fatalf("%d endpoint calls, want %d", got, n)
	}
}

func TestExternalReusesConnections(t *testing.T) {
	// Bursts of calls keep their connections for the next burst rather
	// than opening new ones each time (http.DefaultClient keeps two).
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, &Factory{}, s.URL)
	const burst = 20
	for wave := range 2 {
		release := make(chan struct{})
		s.setBlock(release)
		wait := authenticateAtOnce(t, a, tokens(fmt.Sprint("wave", wave), burst)...)
		for range burst {
			<-s.entered // all in flight at once: each on its own connection
		}
		close(release)
		wait()
	}
	if got := s.conns.Load(); got != burst {
		t.Fatalf("%d connections opened for two bursts of %d calls, want %d", got, burst, burst)
	}
}

func TestExternalWaiterGivesUp(t *testing.T) {
	// One registration abandoning the shared call does not fail the others.
	s := newAuthServer(t, http.StatusOK)
	release := make(chan struct{})
	s.setBlock(release)
	a := newExternalAuth(t, &Factory{}, s.URL)

	ctx, cancel := context.WithCancel(t.Context())
	first := make(chan error, 1)
	go func() { first <- a.Authenticate(ctx, md("Bearer tok")) }()
	<-s.entered
	second := make(chan error, 1)
	go func() { second <- a.Authenticate(t.Context(), md("Bearer tok")) }()
	cancel()
	if err := <-first; outcomeOf(err) != fail || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled registration: %v", err)
	}
	close(release)
	if err := <-second; err != nil {
		t.Fatalf("second registration: %v", err)
	}
	if n := s.calls.Load(); n != 1 {
		t.Fatalf("%d calls, want 1", n)
	}
}

func TestExternalReload(t *testing.T) {
	f := &Factory{}
	one := newAuthServer(t, http.StatusOK)
	two := newAuthServer(t, http.StatusForbidden)
	a := newExternalAuth(t, f, one.URL)
	b := newExternalAuth(t, f, one.URL) // another group, same endpoint
	expect(t, a, "Bearer tok", allow)
	one.Close()

	// A reload keeping the endpoint keeps the warm cache, as does another
	// group using it.
	expect(t, newExternalAuth(t, f, one.URL), "Bearer tok", allow)
	expect(t, b, "Bearer tok", allow)
	// A reload changing it starts cold: the new endpoint decides.
	expect(t, newExternalAuth(t, f, two.URL), "Bearer tok", deny)
	if n := two.calls.Load(); n != 1 {
		t.Fatalf("new endpoint called %d times", n)
	}
}

func TestExternalMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := &Factory{Registerer: reg}
	s := newAuthServer(t, http.StatusOK)
	a := newExternalAuth(t, f, s.URL)
	expect(t, a, "Bearer a", allow)
	expect(t, a, "Bearer a", allow) // hit
	s.status.Store(http.StatusForbidden)
	expect(t, a, "Bearer b", deny)
	s.status.Store(http.StatusInternalServerError)
	expect(t, a, "Bearer c", fail)

	// A second Factory on the same registry shares the collectors.
	if _, err := (&Factory{Registerer: reg}).New(externalAuth(s.URL)); err != nil {
		t.Fatal(err)
	}

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "/" + l.GetValue()
			}
			got[name] = value(m)
		}
	}
	want := map[string]float64{
		"reverst_auth_external_requests_total/allow":           1,
		"reverst_auth_external_requests_total/deny":            1,
		"reverst_auth_external_requests_total/error":           1,
		"reverst_auth_external_cache_hits_total":               1,
		"reverst_auth_external_cache_misses_total":             3,
		"reverst_auth_external_request_duration_seconds/allow": 1,
		"reverst_auth_external_request_duration_seconds/deny":  1,
		"reverst_auth_external_request_duration_seconds/error": 1,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("metrics %v, want exactly %v", got, want)
	}
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return -1
}

func TestExternalErrorsHideEndpointSecrets(t *testing.T) {
	s := newAuthServer(t, http.StatusInternalServerError)
	const secret = "endpoint-api-key-123"
	a := newExternalAuth(t, &Factory{}, strings.Replace(s.URL, "http://", "http://op:"+secret+"@", 1)+"/check?key="+secret)
	err := expect(t, a, "Bearer tok", fail)
	if strings.Contains(err.Error(), secret) {
		t.Fatalf("error leaks endpoint secret: %v", err)
	}
	s.Close()
	err = expect(t, a, "Bearer tok", fail)
	if strings.Contains(err.Error(), secret) {
		t.Fatalf("error leaks endpoint secret: %v", err)
	}
}
