package tunnel

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the server's Prometheus metrics. Group labels only ever hold
// configured group names (or "" for requests and registrations that match
// no group), never raw visitor or client input, and a group's series go
// when a reload removes it. A nil *Metrics records nothing.
type Metrics struct {
	registrations *prometheus.CounterVec
	members       *prometheus.GaugeVec
	requests      *prometheus.CounterVec
	latency       *prometheus.HistogramVec
	dataConns     *prometheus.CounterVec

	// membersMu orders the member gauge's updates; see setMembers.
	membersMu sync.Mutex
}

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "reverst", Name: "registrations_total",
			Help: "Tunnel registrations by group and result (ok, unauthorized, not_found, bad_request, timeout, rate_limited, error).",
		}, []string{"group", "result"}),
		members: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "reverst", Name: "group_members",
			Help: "Registered tunnel connections per group.",
		}, []string{"group"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "reverst", Name: "proxied_requests_total",
			Help: "Frontend requests by group and status class.",
		}, []string{"group", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "reverst", Name: "request_duration_seconds",
			Help:    "Time to proxy a frontend request, until the response body is done.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14),
		}, []string{"group"}),
		dataConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "reverst", Name: "data_connections_total",
			Help: "Data connections from members by result (ok, refused).",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.registrations, m.members, m.requests, m.latency, m.dataConns)
	}
	return m
}

// registration counts a registration of g, nil when it named no known
// group.
func (m *Metrics) registration(g *group, result string) {
	if m == nil || !live(g) {
		return
	}
	m.registrations.WithLabelValues(label(g), result).Inc()
	m.recheck(g)
}

// setMembers sets g's member gauge to its size. Joins and leaves race to
// get here; reading the size under one lock makes the last update read
// the last size, and a group removed meanwhile keeps its series deleted.
func (m *Metrics) setMembers(g *group) {
	if m == nil {
		return
	}
	m.membersMu.Lock()
	defer m.membersMu.Unlock()
	if g.isRemoved() {
		return
	}
	m.members.WithLabelValues(g.name).Set(float64(g.size()))
}

// groupRemoved deletes the series of g, which retire marked removed: a
// reload that drops groups for good (one per preview environment, say)
// must not leave theirs behind.
func (m *Metrics) groupRemoved(g *group) {
	if m == nil {
		return
	}
	m.membersMu.Lock()
	m.members.DeleteLabelValues(g.name)
	m.membersMu.Unlock()
	m.forget(g.name)
}

// forget deletes the request and registration series of a removed group.
func (m *Metrics) forget(name string) {
	labels := prometheus.Labels{"group": name}
	m.requests.DeletePartialMatch(labels)
	m.latency.DeleteLabelValues(name)
	m.registrations.DeletePartialMatch(labels)
}

// live reports whether g's series may be recorded. Those of a removed
// group were deleted, and a request or registration of it that ends
// afterwards (its members are closed then, failing what they had in
// flight) must not bring them back. A nil g, no group, is always live.
func live(g *group) bool { return g == nil || !g.isRemoved() }

// recheck deletes again the series of g, just recorded, if g was removed
// meanwhile, after groupRemoved had run.
func (m *Metrics) recheck(g *group) {
	if !live(g) {
		m.forget(g.name)
	}
}

// label is the group label of g: "" for no group.
func label(g *group) string {
	if g == nil {
		return ""
	}
	return g.name
}

// request counts a frontend request of g, nil when it matched no group.
func (m *Metrics) request(g *group, status int, d time.Duration) {
	if m == nil || !live(g) {
		return
	}
	m.requests.WithLabelValues(label(g), statusClass(status)).Inc()
	m.latency.WithLabelValues(label(g)).Observe(d.Seconds())
	m.recheck(g)
}

func (m *Metrics) dataConn(result string) {
	if m == nil {
		return
	}
	m.dataConns.WithLabelValues(result).Inc()
}

func statusClass(code int) string {
	if code < 100 || code > 599 {
		return "other"
	}
	return strconv.Itoa(code/100) + "xx"
}
