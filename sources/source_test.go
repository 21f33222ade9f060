package sources

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/groups"
)

// waitFor is how long a test waits for something that should happen within
// a second or two.
const waitFor = 10 * time.Second

// definition returns a valid definition with one open group per name.
func definition(names ...string) []byte {
	s := "groups:\n"
	for _, n := range names {
		s += fmt.Sprintf("  %s:\n    hosts: [%s.example]\n", n, n)
	}
	return []byte(s)
}

// broken does not validate: a group without hosts.
var broken = []byte("groups:\n  x:\n    hosts: []\n")

// applied records what Watch applies.
type applied struct {
	mu    sync.Mutex
	calls [][]string // sorted group names of each call
	ch    chan struct{}
	err   error // returned by apply when set
}

func newApplied() *applied { return &applied{ch: make(chan struct{}, 1)} }

func (a *applied) apply(cfg *groups.Config) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, cfg.Names())
	select {
	case a.ch <- struct{}{}:
	default:
	}
	return a.err
}

func (a *applied) snapshot() [][]string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// waitLast waits until the last applied definition has exactly names.
func (a *applied) waitLast(t *testing.T, names ...string) {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		if calls := a.snapshot(); len(calls) > 0 && slices.Equal(calls[len(calls)-1], names) {
			return
		}
		select {
		case <-a.ch:
		case <-deadline:
			t.Fatalf("applied %v, want last %v", a.snapshot(), names)
		}
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// reloads returns the reload counter of source and result in reg.
func reloads(t *testing.T, reg *prometheus.Registry, source, result string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "reverst_groups_reloads_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["source"] == source && labels["result"] == result {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func lastSuccess(t *testing.T, reg *prometheus.Registry, source string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "reverst_groups_last_reload_success_timestamp_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == source {
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// watch runs src.Watch until the test ends and checks that it returned
// ctx's error.
func watch(t *testing.T, src Source, a *applied) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Watch(ctx, a.apply) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != context.Canceled {
				t.Errorf("Watch returned %v, want context.Canceled", err)
			}
		case <-time.After(waitFor):
			t.Errorf("Watch did not return after cancel")
		}
	})
}

func TestOpen(t *testing.T) {
	for _, tc := range []struct {
		location string
		want     string // String(), "" for an error
	}{
		{"/etc/reverst/groups.yml", "file /etc/reverst/groups.yml"},
		{"file:///etc/reverst/groups.yml", "file /etc/reverst/groups.yml"},
		{"file://elsewhere/groups.yml", ""},
		{"https://user:secret@example.com/groups.yml?token=x", "url https://example.com/groups.yml?REDACTED"},
		{"http://example.com/g.yml", "url http://example.com/g.yml"},
		{"http:///nohost", ""},
		{"k8s://configmap/ns/name/groups.yml", "k8s://configmap/ns/name/groups.yml"},
		{"k8s://configmap/ns/name", ""},
		{"k8s://secret/ns/name/key", ""},
		{"ftp://example.com/x", ""},
	} {
		src, err := Open(tc.location, Options{})
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("Open(%q) = %v, want an error", tc.location, src)
		case tc.want != "" && err != nil:
			t.Errorf("Open(%q): %v", tc.location, err)
		case tc.want != "" && src.String() != tc.want:
			t.Errorf("Open(%q).String() = %q, want %q", tc.location, src.String(), tc.want)
		}
	}
}

func TestOpenSharesRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	for _, loc := range []string{"/a/groups.yml", "/b/groups.yml"} {
		if _, err := Open(loc, Options{Registerer: reg}); err != nil {
			t.Fatalf("Open(%q): %v", loc, err)
		}
	}
}
