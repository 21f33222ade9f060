package app

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/sources"
	"github.com/reverst-dev/reverst/tunnel"
)

// wiring connects a groups definition to the tunnel server.
type wiring struct {
	cfg     *Config
	logger  *slog.Logger
	srv     *tunnel.Server
	reg     *prometheus.Registry
	newAuth func(groups.Authentication) (tunnel.Authenticator, error)
	ready   atomic.Bool
}

// apply turns a validated definition into tunnel groups and swaps them in.
// Any failure leaves the running groups untouched.
func (w *wiring) apply(cfg *groups.Config) error {
	defs := make([]tunnel.Group, 0, len(cfg.Groups))
	for _, name := range cfg.Names() {
		g := cfg.Groups[name]
		def := tunnel.Group{Name: name, Hosts: g.Hosts}
		if !g.Authentication.Open() {
			if w.newAuth == nil {
				return fmt.Errorf("group %q: authentication is configured but no authenticator is wired", name)
			}
			a, err := w.newAuth(g.Authentication)
			if err != nil {
				return fmt.Errorf("group %q: authentication: %w", name, err)
			}
			def.Auth = a
		}
		defs = append(defs, def)
	}
	if err := w.srv.SetGroups(defs); err != nil {
		return err
	}
	for _, name := range cfg.Names() {
		g := cfg.Groups[name]
		if g.Authentication.Open() {
			w.logger.Warn("tunnel group has no authentication: anyone can register and receive its traffic", "group", name, "hosts", g.Hosts)
		}
	}
	w.logger.Info("tunnel groups applied", "groups", len(defs))
	return nil
}

// management serves /metrics, /healthz, /readyz and /status.
func (w *wiring) management(source sources.Source) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(w.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = rw.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /status", func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(rw)
		enc.SetIndent("", "  ")
		_ = enc.Encode(struct {
			Groups []tunnel.GroupStatus `json:"groups"`
		}{w.srv.Status()})
	})
	mux.HandleFunc("GET /readyz", func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !w.ready.Load() || !w.srv.HasGroups() {
			rw.WriteHeader(http.StatusServiceUnavailable)
			_, _ = rw.Write([]byte("not ready: listeners or groups not up\n"))
			return
		}
		// A source that fails after the first load keeps its last good
		// groups in force: the server still serves, so it stays ready and
		// says why the source is unhealthy.
		if err := source.Status(); err != nil {
			_, _ = fmt.Fprintf(rw, "ok (groups source %s: %v)\n", source, err)
			return
		}
		_, _ = rw.Write([]byte("ok\n"))
	})
	return mux
}
