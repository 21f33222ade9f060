package tunnel

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the server's Prometheus metrics. Group labels only ever hold
// configured group names (or "" for requests and registrations that match
// no group), never raw visitor or client input. A nil *Metrics records
// nothing.
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

func (m *Metrics) registration(group, result string) {
	if m == nil {
		return
	}
	m.registrations.WithLabelValues(group, result).Inc()
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

// groupRemoved deletes the member gauge of g, which retire marked removed.
func (m *Metrics) groupRemoved(g *group) {
	if m == nil {
		return
	}
	m.membersMu.Lock()
	defer m.membersMu.Unlock()
	m.members.DeleteLabelValues(g.name)
}

func (m *Metrics) request(group string, status int, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(group, statusClass(status)).Inc()
	m.latency.WithLabelValues(group).Observe(d.Seconds())
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
