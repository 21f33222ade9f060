package app

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
)

// On SIGTERM every frontend stops taking visitors at once, the server
// reports itself not ready, and the whole stop, however many frontends
// drain, takes at most --shutdown-timeout: a container runtime kills the
// process after its own grace period (docker stop's 10 s).
func TestShutdownStopsEveryFrontendAtOnce(t *testing.T) {
	dir := t.TempDir()
	groupsFile := filepath.Join(dir, "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example]}}`)
	const timeout = 2 * time.Second
	cfg, cancel, done := runExample(t, groupsFile, timeout, "--https-address", testnet.Addr(t, testnet.TCP))
	defer cancel()

	roots := exampleRoots(t)
	release := make(chan struct{})
	defer close(release)
	inflight := make(chan struct{}, 2)
	memberCtx, stopMember := context.WithCancel(context.Background())
	defer stopMember()
	join(t, memberCtx, cfg, &client.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				inflight <- struct{}{}
				select {
				case <-release:
				case <-time.After(30 * time.Second):
				}
			}
			fmt.Fprint(w, "ok")
		}),
	})
	newHTTPS := func() *http.Client {
		return &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
			TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "flipt.dev.local"}}}
	}
	get := func(c *http.Client, url string) (int, error) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Host = "svc.example"
		resp, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := get(newHTTPS(), "https://"+cfg.HTTPSAddress+"/"); err != nil || code != 200 {
		t.Fatalf("https before stop: %d %v", code, err)
	}
	// A request in flight on each frontend.
	go get(&http.Client{}, "http://"+cfg.HTTPAddress+"/slow")
	go get(newHTTPS(), "https://"+cfg.HTTPSAddress+"/slow")
	for range 2 {
		select {
		case <-inflight:
		case <-time.After(10 * time.Second):
			t.Fatal("the slow requests did not reach the member")
		}
	}

	// From then on no frontend takes a visitor, while the slow requests
	// hold the drain open.
	start := stopAndAwaitDrain(t, cancel, cfg.ManagementAddress, timeout)
	// Every frontend closes its listener as the stop begins, not after
	// another frontend's drain (which the slow requests make last the
	// whole timeout).
	for {
		code, err := get(newHTTPS(), "https://"+cfg.HTTPSAddress+"/")
		if err != nil {
			break
		}
		if time.Since(start) > timeout/2 {
			t.Errorf("new HTTPS visitors still served (%d) %v after SIGTERM", code, time.Since(start).Round(time.Millisecond))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
		if took := time.Since(start); took > timeout+time.Second {
			t.Errorf("stop took %v with --shutdown-timeout %v", took.Round(time.Millisecond), timeout)
		}
	case <-time.After(4*timeout + 5*time.Second):
		t.Fatal("Run did not return")
	}
}

// A SIGTERM while the groups source has not answered yet is a clean stop.
func TestStopBeforeStart(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hold:
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	cfg, err := ParseConfig([]string{
		"-n", "flipt.dev.local", "-k", "../examples/simple/server.key", "-c", "../examples/simple/server.crt",
		"-g", slow.URL + "/groups.yml", "-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP),
	}, map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, slog.New(slog.DiscardHandler)) }()
	time.Sleep(200 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v, want a clean stop", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
}

// On SIGTERM the server stops taking registrations at once, as it stops
// taking visitors: a member that registered while the requests in flight
// drain would serve nobody, and be cut when the drain ends, rather than
// go to a replica that stays.
func TestShutdownStopsTakingRegistrations(t *testing.T) {
	groupsFile := filepath.Join(t.TempDir(), "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example]}}`)
	const timeout = 4 * time.Second
	cfg, cancel, done := runExample(t, groupsFile, timeout)
	defer cancel()

	release := make(chan struct{})
	inflight := make(chan struct{}, 1)
	memberCtx, stopMember := context.WithCancel(context.Background())
	defer stopMember()
	join(t, memberCtx, cfg, &client.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			inflight <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}),
	})
	go func() {
		req, _ := http.NewRequest(http.MethodGet, "http://"+cfg.HTTPAddress+"/slow", nil)
		req.Host = "svc.example"
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	select {
	case <-inflight:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request did not reach the member")
	}

	start := stopAndAwaitDrain(t, cancel, cfg.ManagementAddress, timeout/2)
	// The slow request holds the drain open; a new member comes meanwhile.
	registered := make(chan struct{}, 1)
	late := &client.Server{
		TunnelGroup: "svc",
		Handler:     http.NotFoundHandler(),
		TLSConfig:   &tls.Config{RootCAs: exampleRoots(t), ServerName: "flipt.dev.local"},
		Logger:      slog.New(slog.DiscardHandler),
		OnConnectionReady: func(client.ConnectionInfo) {
			select {
			case registered <- struct{}{}:
			default:
			}
		},
	}
	lateCtx, stopLate := context.WithCancel(context.Background())
	defer stopLate()
	go func() { _ = late.DialAndServe(lateCtx, cfg.TunnelAddress) }()
	select {
	case <-registered:
		t.Errorf("a member registered %v after SIGTERM, while the server drains", time.Since(start).Round(time.Millisecond))
	case <-time.After(timeout / 4):
	}
	stopLate()
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(2*timeout + 5*time.Second):
		t.Fatal("Run did not return")
	}
}

// stopAndAwaitDrain cancels the server's context, as SIGTERM does, and
// waits for /readyz to say that the stop has begun. It returns when the
// stop was asked for.
func stopAndAwaitDrain(t *testing.T, cancel context.CancelFunc, mgmtAddr string, within time.Duration) time.Time {
	t.Helper()
	start := time.Now()
	cancel()
	for {
		resp, err := http.Get("http://" + mgmtAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusServiceUnavailable {
				return start
			}
		}
		if time.Since(start) > within {
			t.Fatalf("/readyz not 503 %v after SIGTERM (last error %v)", within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runExample runs the server with the example's certificate, groupsFile,
// the shutdown timeout and args, on free ports; cancel stops it as SIGTERM
// does, and done receives what Run returned.
func runExample(t *testing.T, groupsFile string, timeout time.Duration, args ...string) (*Config, context.CancelFunc, <-chan error) {
	t.Helper()
	cfg, err := ParseConfig(append([]string{
		"-n", "flipt.dev.local", "-k", "../examples/simple/server.key", "-c", "../examples/simple/server.crt",
		"-g", groupsFile, "-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP),
		"--shutdown-timeout", timeout.String(), "--management-address", testnet.Addr(t, testnet.TCP),
	}, args...), map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, slog.New(slog.DiscardHandler)) }()
	return cfg, cancel, done
}
