package sources

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the reload counters, labelled by source name (which comes
// from configuration only).
type metrics struct {
	reloads     *prometheus.CounterVec
	lastSuccess *prometheus.GaugeVec
}

// newMetrics registers the reload metrics with reg, or reuses the ones
// already registered there, so that several sources can share a registry.
// A nil reg gives working metrics that nobody collects.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "reverst",
			Name:      "groups_reloads_total",
			Help:      "Tunnel group definitions read by a source, by result (success: valid and applied; failure: unreadable, invalid or refused).",
		}, []string{"source", "result"}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "reverst",
			Name:      "groups_last_reload_success_timestamp_seconds",
			Help:      "Unix time of the last valid tunnel group definition loaded or applied from a source.",
		}, []string{"source"}),
	}
	if reg == nil {
		return m, nil
	}
	var err error
	if m.reloads, err = register(reg, m.reloads); err != nil {
		return nil, err
	}
	if m.lastSuccess, err = register(reg, m.lastSuccess); err != nil {
		return nil, err
	}
	return m, nil
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var already prometheus.AlreadyRegisteredError
	if errors.As(err, &already) {
		if existing, ok := already.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, fmt.Errorf("sources: registering metrics: %w", err)
}
