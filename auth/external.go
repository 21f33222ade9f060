package auth

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http/httpguts"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
)

// external asks an HTTP endpoint. The endpoint's answer is cached by the
// Factory; concurrent checks of the same credentials share one call.
type external struct {
	f        *Factory
	endpoint string
	// safe names the endpoint in errors and logs: without user info or
	// query, either of which may hold a secret of the operator's.
	safe string
}

func newExternal(f *Factory, e *groups.External) (*external, error) {
	u, err := url.Parse(e.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("auth: external.endpoint: not an http(s) URL")
	}
	safe := (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
	return &external{f: f, endpoint: e.Endpoint, safe: safe}, nil
}

// decision is a cached endpoint answer.
type decision struct {
	allow   bool
	expires time.Time
}

// cacheKey identifies credentials for an endpoint without holding them.
type cacheKey [sha256.Size]byte

func keyOf(endpoint, scheme, payload string) cacheKey {
	h := sha256.New()
	// Length prefixes keep ("a", "bc") and ("ab", "c") apart.
	for _, s := range []string{endpoint, scheme, payload} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		io.WriteString(h, s)
	}
	var k cacheKey
	h.Sum(k[:0])
	return k
}

var errDenied = fmt.Errorf("%w: denied by the external endpoint", protocol.ErrUnauthorized)

func (e *external) check(ctx context.Context, presented, scheme, payload string) error {
	f := e.f
	// The client's credentials go out as a header value as they are: one
	// that HTTP cannot carry (a control character) would fail the request
	// before it is sent, as a server error the client retries, so deny it
	// here.
	if !httpguts.ValidHeaderFieldValue(presented) {
		f.logger().DebugContext(ctx, "registration denied", "reason", "credentials not a valid header value")
		return fmt.Errorf("%w (not a valid header value)", errBadCredential)
	}
	key := keyOf(e.endpoint, scheme, payload)
	if d, ok := e.cached(key); ok {
		f.metrics.cacheHit()
		f.logger().DebugContext(ctx, "external auth decision", "endpoint", e.safe, "allow", d.allow, "cached", true)
		return d.err()
	}
	f.metrics.cacheMiss()

	// The call runs detached from the first caller's context so that one
	// registration giving up does not fail the others waiting on it; it
	// is bounded by the per-call timeout instead.
	ch := f.flight.DoChan(string(key[:]), func() (any, error) {
		// A caller that missed the cache just before the previous call
		// stored its answer finds it here rather than calling again.
		if d, ok := e.cached(key); ok {
			return d, nil
		}
		return e.call(context.WithoutCancel(ctx), key, presented)
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return r.Err
		}
		return r.Val.(decision).err()
	case <-ctx.Done():
		return fmt.Errorf("auth: waiting for external endpoint %s: %w", e.safe, context.Cause(ctx))
	}
}

func (d decision) err() error {
	if d.allow {
		return nil
	}
	return errDenied
}

func (e *external) cached(key cacheKey) (decision, bool) {
	for _, c := range []*expirable.LRU[cacheKey, decision]{e.f.allows, e.f.denials} {
		if c == nil {
			continue
		}
		d, ok := c.Get(key)
		if !ok {
			continue
		}
		if !e.f.clock().Before(d.expires) {
			c.Remove(key)
			continue
		}
		return d, true
	}
	return decision{}, false
}

// remember caches d, in place of any other decision on the same key.
func (e *external) remember(key cacheKey, d decision) {
	f := e.f
	keep, drop, ttl := f.allows, f.denials, f.allowTTL
	if !d.allow {
		keep, drop, ttl = f.denials, f.allows, f.denyTTL
	}
	if drop != nil {
		drop.Remove(key)
	}
	if keep != nil {
		// Each entry carries its own expiry, which the tests' clock
		// moves; the LRU's TTL only purges what can no longer be used.
		d.expires = f.clock().Add(ttl)
		keep.Add(key, d)
	}
}

// call asks the endpoint once and caches a decision; an error (see
// decide) is not cached.
func (e *external) call(ctx context.Context, key cacheKey, presented string) (decision, error) {
	f := e.f
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	start := time.Now()
	var (
		d      decision
		status int
		err    error
	)
	select {
	case f.calls <- struct{}{}:
		d, status, err = e.do(ctx, presented)
		<-f.calls
	case <-ctx.Done():
		err = fmt.Errorf("auth: external endpoint %s: %d calls in flight, no slot within %v", e.safe, maxExternalCalls, f.timeout)
	}
	elapsed := time.Since(start)

	result := "error"
	switch {
	case err != nil:
	case d.allow:
		result = "allow"
	default:
		result = "deny"
	}
	f.metrics.observe(result, elapsed)
	log := f.logger().With("endpoint", e.safe, "status", status, "duration", elapsed)
	if err != nil {
		log.DebugContext(ctx, "external auth call failed", "error", err)
		return decision{}, err
	}
	log.DebugContext(ctx, "external auth decision", "allow", d.allow, "cached", false)

	e.remember(key, d)
	return d, nil
}

func (e *external) do(ctx context.Context, presented string) (decision, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.endpoint, nil)
	if err != nil {
		return decision{}, 0, fmt.Errorf("auth: external endpoint %s: building request: %w", e.safe, unwrapURL(err))
	}
	req.Header.Set("Authorization", presented)
	req.Header.Set("User-Agent", "reverst")
	resp, err := e.f.client.Do(req)
	if err != nil {
		return decision{}, 0, fmt.Errorf("auth: external endpoint %s: %w", e.safe, unwrapURL(err))
	}
	// Drain a little so the connection can be reused; the body is unused.
	_, _ = io.CopyN(io.Discard, resp.Body, 4<<10)
	_ = resp.Body.Close()
	if !decisive(resp.StatusCode) {
		return decision{}, resp.StatusCode, fmt.Errorf("auth: external endpoint %s: unexpected status %d", e.safe, resp.StatusCode)
	}
	return decision{allow: resp.StatusCode == http.StatusOK}, resp.StatusCode, nil
}

// decisive reports whether the endpoint's status is a decision. The
// protocol has 200 allow and anything else deny; but a status that says
// the endpoint could not decide now (408, 429, 5xx) or is not where it was
// configured (3xx, which is not followed) would tell a member with good
// credentials to stop retrying, so those are errors: the member is asked
// to retry and nothing is cached.
func decisive(status int) bool {
	switch {
	case status == http.StatusRequestTimeout, status == http.StatusTooManyRequests:
		return false
	case status >= 200 && status < 300, status >= 400 && status < 500:
		return true
	}
	return false
}

// unwrapURL drops the *url.Error wrapper, whose message repeats the full
// endpoint URL, query and all.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// metrics of the external strategy. A nil *metrics records nothing.
type metrics struct {
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	hits     prometheus.Counter
	misses   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "reverst_auth_external_requests_total",
			Help: "Calls to external authentication endpoints by result (allow, deny, error).",
		}, []string{"result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "reverst_auth_external_request_duration_seconds",
			Help:    "Latency of calls to external authentication endpoints by result.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"result"}),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "reverst_auth_external_cache_hits_total",
			Help: "External authentication decisions served from the cache.",
		}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "reverst_auth_external_cache_misses_total",
			Help: "External authentication checks not answered by the cache.",
		}),
	}
	if err := register(reg, &m.calls); err != nil {
		return nil, err
	}
	if err := register(reg, &m.duration); err != nil {
		return nil, err
	}
	if err := register(reg, &m.hits); err != nil {
		return nil, err
	}
	if err := register(reg, &m.misses); err != nil {
		return nil, err
	}
	// Results are known up front: show them at zero before the first call.
	for _, r := range []string{"allow", "deny", "error"} {
		m.calls.WithLabelValues(r)
	}
	return m, nil
}

// register registers c, or adopts the collector already registered under
// the same description (a second Factory on the same registry).
func register[C prometheus.Collector](reg prometheus.Registerer, c *C) error {
	err := reg.Register(*c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			*c = existing
			return nil
		}
	}
	return err
}

func (m *metrics) cacheHit() {
	if m != nil {
		m.hits.Inc()
	}
}

func (m *metrics) cacheMiss() {
	if m != nil {
		m.misses.Inc()
	}
}

func (m *metrics) observe(result string, d time.Duration) {
	if m != nil {
		m.calls.WithLabelValues(result).Inc()
		m.duration.WithLabelValues(result).Observe(d.Seconds())
	}
}
