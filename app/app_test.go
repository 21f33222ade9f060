package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path+".tmp", []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

func httpGet(t *testing.T, c *http.Client, url, host string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if host != "" {
		req.Host = host
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestRun runs the whole server on loopback with the bundled example's
// certificate: a client registers and is reached over HTTP and HTTPS, the
// management API answers, a groups file change is applied live, and a
// cancelled context stops everything cleanly.
// exampleRoots trusts the example server certificate.
func exampleRoots(t *testing.T) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile("../examples/simple/server.crt")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	return roots
}

// join registers member in group svc of the server cfg describes, until
// ctx ends, and waits until it is connected.
func join(t *testing.T, ctx context.Context, cfg *Config, member *client.Server) {
	t.Helper()
	ready := make(chan struct{}, 1)
	member.TunnelGroup = "svc"
	member.TLSConfig = &tls.Config{RootCAs: exampleRoots(t), ServerName: "flipt.dev.local"}
	member.Logger = slog.New(slog.DiscardHandler)
	member.OnConnectionReady = func(client.ConnectionInfo) {
		select {
		case ready <- struct{}{}:
		default:
		}
	}
	go func() { _ = member.DialAndServe(ctx, cfg.TunnelAddress) }()
	select {
	case <-ready:
	case <-time.After(5 * time.Second):
		t.Fatal("member not registered")
	}
}

// startRun parses args and runs the server until the test ends, when it
// must stop cleanly.
func startRun(t *testing.T, args ...string) *Config {
	t.Helper()
	cfg, err := ParseConfig(args, map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return cfg
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	groupsFile := filepath.Join(dir, "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example], authentication: {bearer: {token: secret}}}}`)
	cfg := startRun(t,
		"-n", "flipt.dev.local",
		"-k", "../examples/simple/server.key",
		"-c", "../examples/simple/server.crt",
		"-g", groupsFile, "-w",
		"-a", testnet.Addr(t, testnet.Tunnel),
		"-s", testnet.Addr(t, testnet.TCP),
		"--https-address", testnet.Addr(t, testnet.TCP),
		"--management-address", testnet.Addr(t, testnet.TCP),
	)

	mgmt := "http://" + cfg.ManagementAddress
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get(mgmt + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	roots := exampleRoots(t)
	join(t, t.Context(), cfg, &client.Server{
		Handler:       http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "hi %s via %s", r.URL.Path, r.Proto) }),
		Authenticator: client.BearerAuthenticator("secret"),
	})

	if code, body := httpGet(t, http.DefaultClient, "http://"+cfg.HTTPAddress+"/x", "svc.example"); code != 200 || !strings.HasPrefix(body, "hi /x") {
		t.Fatalf("http frontend: %d %q", code, body)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "flipt.dev.local"}, ForceAttemptHTTP2: true}
	resp, err := (&http.Client{Transport: tr}).Get("https://" + cfg.HTTPSAddress + "/y")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 502 || resp.Proto != "HTTP/2.0" {
		t.Fatalf("https frontend with host flipt.dev.local: %d %s, want 502 over HTTP/2", resp.StatusCode, resp.Proto)
	}
	if code, body := httpGet(t, &http.Client{Transport: tr}, "https://"+cfg.HTTPSAddress+"/y", "svc.example"); code != 200 || !strings.HasPrefix(body, "hi /y") {
		t.Fatalf("https frontend: %d %q", code, body)
	}

	var status struct {
		Groups []struct {
			Name    string
			Hosts   []string
			Members []struct {
				RemoteAddr string
				Draining   bool
			}
		}
	}
	_, body := httpGet(t, http.DefaultClient, mgmt+"/status", "")
	if err := json.Unmarshal([]byte(body), &status); err != nil {
		t.Fatalf("status %q: %v", body, err)
	}
	if len(status.Groups) != 1 || status.Groups[0].Name != "svc" || len(status.Groups[0].Members) != 1 {
		t.Fatalf("status: %s", body)
	}
	if code, body := httpGet(t, http.DefaultClient, mgmt+"/metrics", ""); code != 200 ||
		!strings.Contains(body, `reverst_group_members{group="svc"} 1`) ||
		!strings.Contains(body, `reverst_proxied_requests_total{code="2xx",group="svc"} 2`) ||
		!strings.Contains(body, `reverst_certificate_not_after_timestamp_seconds{certificate="tunnel"} `) {
		t.Fatalf("metrics: %d\n%s", code, body)
	}
	if code, body := httpGet(t, http.DefaultClient, mgmt+"/healthz", ""); code != 200 {
		t.Fatalf("healthz: %d %q", code, body)
	}
	// The member's data connections reach the tunnel port over TCP.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, body := httpGet(t, http.DefaultClient, "http://"+cfg.HTTPAddress+"/d", "svc.example")
		if body == "hi /d via HTTP/1.1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("requests still reach the member as %q, not over data connections", body)
		}
	}

	// A broken edit keeps the groups; a good one is applied, and the
	// member of a kept group stays.
	writeFile(t, groupsFile, `groups: {svc: {hosts: []}}`)
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example, new.example], authentication: {bearer: {token: secret}}}, other: {hosts: [other.example]}}`)
	deadline = time.Now().Add(5 * time.Second)
	for {
		code, _ := httpGet(t, http.DefaultClient, "http://"+cfg.HTTPAddress+"/z", "new.example")
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reload not applied: %d", code)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code, _ := httpGet(t, http.DefaultClient, "http://"+cfg.HTTPAddress+"/", "other.example"); code != 503 {
		t.Fatalf("new group: %d, want 503", code)
	}
}

func TestRunRejectsInvalidGroups(t *testing.T) {
	dir := t.TempDir()
	groupsFile := filepath.Join(dir, "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [a], authentication: {basic: {username: u}}}}`)
	cfg, err := ParseConfig([]string{"-n", "x", "-k", "../examples/simple/server.key", "-c", "../examples/simple/server.crt", "-g", groupsFile,
		"-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP)}, map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = Run(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), `group "svc"`) || !strings.Contains(err.Error(), "basic.password") {
		t.Fatalf("got %v, want an error naming the group and field", err)
	}
}

func TestHealthcheck(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
		}
	}))
	defer ok.Close()
	var stderr strings.Builder
	if code := Healthcheck(context.Background(), []string{ok.URL + "/readyz"}, &stderr); code != 0 {
		t.Fatalf("ready server: exit %d, %s", code, stderr.String())
	}
	if code := Healthcheck(context.Background(), []string{ok.URL + "/other"}, &stderr); code != 1 {
		t.Fatalf("unready server: exit %d", code)
	}
	t.Setenv("REVERST_MANAGEMENT_ADDRESS", "0.0.0.0:"+strings.Split(ok.URL, ":")[2])
	if code := Healthcheck(context.Background(), nil, &stderr); code != 0 {
		t.Fatalf("from env: exit %d, %s", code, stderr.String())
	}
	t.Setenv("REVERST_MANAGEMENT_ADDRESS", "")
	if code := Healthcheck(context.Background(), nil, &stderr); code != 2 {
		t.Fatalf("nothing to probe: exit %d", code)
	}
}

// TestManagementServerTimeouts: a connection kept alive after a request
// must be closed once idle (without IdleTimeout net/http keeps it for good,
// 90 s and counting in a manual run), so that idle connections cannot pile
// up until the process runs out of file descriptors; and a slow header
// must not hold one either.
func TestManagementServerTimeouts(t *testing.T) {
	srv := managementServer(http.NotFoundHandler())
	if srv.IdleTimeout <= 0 || srv.IdleTimeout > 2*time.Minute {
		t.Errorf("IdleTimeout = %v, want a minute or two", srv.IdleTimeout)
	}
	if srv.ReadHeaderTimeout <= 0 {
		t.Errorf("ReadHeaderTimeout = %v, want one", srv.ReadHeaderTimeout)
	}
}

// TestReadyzHidesSecretsOfABadReload: /readyz, unauthenticated, reports
// why the groups source is failing; a broken edit that puts a token where
// a mapping belongs must not show the token there.
func TestReadyzHidesSecretsOfABadReload(t *testing.T) {
	groupsFile := filepath.Join(t.TempDir(), "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example], authentication: {bearer: {token: s3cret}}}}`)
	cfg := startRun(t,
		"-n", "flipt.dev.local", "-k", "../examples/simple/server.key", "-c", "../examples/simple/server.crt",
		"-g", groupsFile, "-w",
		"-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP),
		"--management-address", testnet.Addr(t, testnet.TCP),
	)
	readyz := "http://" + cfg.ManagementAddress + "/readyz"
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if resp, err := http.Get(readyz); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("not ready")
		}
	}
	// The token written straight under bearer, as a first-time operator
	// might.
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example], authentication: {bearer: s3cret}}}`)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, body := httpGet(t, http.DefaultClient, readyz, "")
		if strings.Contains(body, "groups.Bearer") {
			if strings.Contains(body, "s3cr") {
				t.Fatalf("/readyz shows the token: %q", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz does not report the broken reload: %q", body)
		}
	}
}
