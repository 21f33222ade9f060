package docker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ory/dockertest/v3"
	dc "github.com/ory/dockertest/v3/docker"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
)

const (
	// imageRepo and imageTag name the image the suite builds; the build is
	// the same as .ci/test's `docker build`, so it finds that one cached.
	imageRepo = "reverst-e2e"
	imageTag  = "dev"

	serverName = "flipt.dev.local"
	groupName  = "flipt.dev.local"
	username   = "user"
	password   = "pass"

	// configDir is where the suite mounts groups, certificate and key.
	configDir = "/etc/reverst"

	// stopGrace is the grace period given to `docker stop`.
	stopGrace = 20 * time.Second
)

const groupsYAML = `groups:
  "flipt.dev.local":
    hosts: ["flipt.dev.local"]
    authentication:
      basic:
        username: "user"
        password: "pass"
`

// suite is what every test shares: the engine, the built image and the
// repository root.
type suite struct {
	pool *dockertest.Pool
	root string
	ca   *x509.CertPool
	ci   bool // CI is set: what is missing fails rather than skips
}

func TestContainer(t *testing.T) {
	s := newSuite(t)

	t.Run("missing required env var", s.testMissingEnv)
	t.Run("serving", s.testServing)
	t.Run("docker stop drains", s.testStop)
	t.Run("compose.yaml", s.testCompose)
}

// newSuite connects to the engine and builds the image once.
func newSuite(t *testing.T) *suite {
	t.Helper()
	ci := os.Getenv("CI") != "" && os.Getenv("CI") != "false" && os.Getenv("CI") != "0"
	if testing.Short() && !ci {
		t.Skip("container suite skipped in -short mode")
	}
	pool, err := dockertest.NewPool("")
	if err == nil {
		err = pool.Client.Ping()
	}
	if err != nil {
		if ci {
			t.Fatalf("CI is set but no Docker engine answers (%v): .ci/test starts one", err)
		}
		msg := fmt.Sprintf("SKIPPING the container suite: no Docker engine answers (%v); run .ci/test or start dockerd", err)
		fmt.Fprintln(os.Stderr, "WARNING:", msg)
		t.Skip(msg)
	}
	pool.MaxWait = time.Minute

	_, file, _, _ := runtime.Caller(0)
	root, err := filepath.Abs(filepath.Join(filepath.Dir(file), "..", ".."))
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if _, err := pool.Client.InspectImage(goImage(t, root)); err != nil {
		t.Logf("making the base images (.ci/base-images)")
		run(t, ctx, root, filepath.Join(root, ".ci", "base-images"))
	}
	start := time.Now()
	run(t, ctx, root, "docker", "build", "-q", "-t", imageRepo+":"+imageTag, ".")
	t.Logf("image built from %s/Dockerfile in %v", root, time.Since(start).Round(time.Millisecond))

	pem, err := os.ReadFile(filepath.Join(root, "examples", "simple", "server.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ca := x509.NewCertPool()
	if !ca.AppendCertsFromPEM(pem) {
		t.Fatal("examples/simple/server.crt holds no certificate")
	}
	return &suite{pool: pool, root: root, ca: ca, ci: ci}
}

// goImage is the Go builder image the Dockerfile names by default.
func goImage(t *testing.T, root string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "ARG GO_IMAGE="); ok {
			return v
		}
	}
	t.Fatal("Dockerfile has no ARG GO_IMAGE=")
	return ""
}

func run(t *testing.T, ctx context.Context, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// server is one running reverst container.
type server struct {
	res        *dockertest.Resource
	configDir  string // host directory mounted at configDir
	tunnelAddr string // host UDP address of the QUIC listener
	httpURL    string // host URL of the HTTP frontend
	mgmtURL    string // host URL of the management server
}

// config writes the mounted directory: the groups file, and the demo
// certificate and key. The container runs as uid 65532, so everything
// must be world-readable.
func (s *suite) config(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"server.crt", "server.key"} {
		b, err := os.ReadFile(filepath.Join(s.root, "examples", "simple", name))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, dir, name, b)
	}
	writeFile(t, dir, "groups.yml", []byte(groupsYAML))
	return dir
}

// writeFile replaces dir/name atomically, as a config management tool
// would: a reader never sees half a file.
func writeFile(t *testing.T, dir, name string, b []byte) {
	t.Helper()
	tmp, err := os.CreateTemp(dir, "."+name+".*")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tmp.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		t.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// baseEnv is the configuration of a server: environment variables only.
func baseEnv() []string {
	return []string{
		"REVERST_LOG=debug",
		"REVERST_SERVER_NAME=" + serverName,
		"REVERST_CERTIFICATE_PATH=" + configDir + "/server.crt",
		"REVERST_PRIVATE_KEY_PATH=" + configDir + "/server.key",
		"REVERST_TUNNEL_GROUPS=" + configDir + "/groups.yml",
		"REVERST_WATCH_GROUPS=true",
	}
}

// start runs a container with env and the config directory mounted, its
// ports published on loopback only, and removes it when the test ends
// (printing its logs if the test failed).
//
// It creates the container itself rather than with Pool.RunWithOptions,
// which sets the stop signal to SIGWINCH: `docker stop` must send the
// image's SIGTERM, as it does for users.
func (s *suite) start(t *testing.T, dir string, env []string) *server {
	t.Helper()
	loopback := []dc.PortBinding{{HostIP: "127.0.0.1", HostPort: "0"}}
	// Clients open their data connections to the TCP port of the address
	// their QUIC connection reached: publish both on one host port.
	tunnel := []dc.PortBinding{{HostIP: "127.0.0.1", HostPort: strconv.Itoa(testnet.Port(t, testnet.Tunnel))}}
	ports := map[dc.Port][]dc.PortBinding{
		"7171/udp": tunnel,
		"7171/tcp": tunnel,
		"8181/tcp": loopback,
		"8080/tcp": loopback,
	}
	exposed := map[dc.Port]struct{}{}
	for p := range ports {
		exposed[p] = struct{}{}
	}
	c, err := s.pool.Client.CreateContainer(dc.CreateContainerOptions{
		Config: &dc.Config{
			Image:        imageRepo + ":" + imageTag,
			Env:          env,
			ExposedPorts: exposed,
			Labels:       map[string]string{"dev.reverst.e2e": t.Name()},
		},
		HostConfig: &dc.HostConfig{
			Binds:         []string{dir + ":" + configDir + ":ro"},
			PortBindings:  ports,
			RestartPolicy: dc.RestartPolicy{Name: "no"},
		},
	})
	if err != nil {
		t.Fatalf("creating the container: %v", err)
	}
	res := &dockertest.Resource{Container: c}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("container logs:\n%s", s.logs(c.ID))
		}
		if err := s.pool.Purge(res); err != nil {
			t.Errorf("removing the container: %v", err)
		}
	})
	if err := s.pool.Client.StartContainer(c.ID, nil); err != nil {
		t.Fatalf("starting the container: %v", err)
	}
	if res.Container, err = s.pool.Client.InspectContainer(c.ID); err != nil {
		t.Fatalf("inspecting the container: %v", err)
	}
	return &server{
		res:        res,
		configDir:  dir,
		tunnelAddr: res.GetHostPort("7171/udp"),
		httpURL:    "http://" + res.GetHostPort("8181/tcp"),
		mgmtURL:    "http://" + res.GetHostPort("8080/tcp"),
	}
}

func (s *suite) logs(id string) string {
	var buf bytes.Buffer
	err := s.pool.Client.Logs(dc.LogsOptions{
		Container:    id,
		OutputStream: &buf,
		ErrorStream:  &buf,
		Stdout:       true,
		Stderr:       true,
	})
	if err != nil {
		return fmt.Sprintf("(no logs: %v)", err)
	}
	return buf.String()
}

// waitReady polls /readyz until the server says it is ready.
func waitReady(t *testing.T, srv *server) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		resp, err := http.Get(srv.mgmtURL + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("server not ready after 30s: %s", last)
}

// member is a tunnel client registered from the test process.
type member struct {
	name   string
	srv    *client.Server
	served atomic.Int64
	proto  atomic.Value  // of the last request served
	ready  chan struct{} // closed at the first registration
	errc   chan error    // DialAndServe's result
}

// register starts a client in group with the given credentials and waits
// until it is registered. The handler answers with the member's name and
// the path, or runs handle when set.
func (s *suite) register(t *testing.T, srv *server, name, group string, auth client.Authenticator, handle http.HandlerFunc) *member {
	t.Helper()
	m := s.dial(t, srv, name, group, auth, handle)
	select {
	case <-m.ready:
	case err := <-m.errc:
		t.Fatalf("%s: registration failed: %v", name, err)
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: not registered after 20s", name)
	}
	return m
}

// dial starts a client without waiting for its registration.
func (s *suite) dial(t *testing.T, srv *server, name, group string, auth client.Authenticator, handle http.HandlerFunc) *member {
	t.Helper()
	m := &member{name: name, ready: make(chan struct{}), errc: make(chan error, 1)}
	var once sync.Once
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.served.Add(1)
		m.proto.Store(r.Proto)
		if handle != nil {
			handle(w, r)
			return
		}
		fmt.Fprintf(w, "%s %s", name, r.URL.Path)
	})
	m.srv = &client.Server{
		TunnelGroup:       group,
		Handler:           h,
		TLSConfig:         &tls.Config{RootCAs: s.ca, ServerName: serverName},
		Authenticator:     auth,
		RetryNotFound:     true,
		Logger:            slog.New(slog.DiscardHandler),
		OnConnectionReady: func(client.ConnectionInfo) { once.Do(func() { close(m.ready) }) },
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { m.errc <- m.srv.DialAndServe(ctx, srv.tunnelAddr) }()
	t.Cleanup(func() {
		cancel()
		_ = m.srv.Close()
	})
	return m
}

// get sends a visitor's request for host to the HTTP frontend.
func get(t *testing.T, srv *server, host, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, srv.httpURL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s (Host %s): %v", path, host, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s (Host %s): reading body: %v", path, host, err)
	}
	return resp.StatusCode, string(body)
}

func (s *suite) testServing(t *testing.T) {
	srv := s.start(t, s.config(t), baseEnv())
	waitReady(t, srv)
	basic := client.BasicAuthenticator(username, password)

	t.Run("request through the tunnel", func(t *testing.T) {
		m := s.register(t, srv, "alpha", groupName, basic, nil)
		code, body := get(t, srv, "FLIPT.dev.local:8181", "/fo")
		if code != http.StatusOK || body != "alpha /fo" {
			t.Fatalf("got %d %q, want 200 %q", code, body, "alpha /fo")
		}
		// Once its data connections are up, requests take them.
		deadline := time.Now().Add(10 * time.Second)
		for m.proto.Load() != "HTTP/1.1" {
			if time.Now().After(deadline) {
				t.Fatalf("requests still arrive over %v, not over data connections", m.proto.Load())
			}
			time.Sleep(50 * time.Millisecond)
			get(t, srv, serverName, "/again")
		}
	})

	t.Run("load balancing across two clients", func(t *testing.T) {
		a := s.register(t, srv, "a", groupName, basic, nil)
		b := s.register(t, srv, "b", groupName, basic, nil)
		for i := range 20 {
			if code, body := get(t, srv, serverName, fmt.Sprintf("/%d", i)); code != http.StatusOK {
				t.Fatalf("request %d: %d %q", i, code, body)
			}
		}
		if a.served.Load() == 0 || b.served.Load() == 0 {
			t.Fatalf("requests not spread: a served %d, b served %d", a.served.Load(), b.served.Load())
		}
	})

	t.Run("bad credentials rejected", func(t *testing.T) {
		m := s.dial(t, srv, "intruder", groupName, client.BasicAuthenticator(username, "wrong"), nil)
		select {
		case err := <-m.errc:
			if !errors.Is(err, client.ErrUnauthorized) {
				t.Fatalf("DialAndServe: %v, want client.ErrUnauthorized", err)
			}
		case <-m.ready:
			t.Fatal("registered with a wrong password")
		case <-time.After(20 * time.Second):
			t.Fatal("no answer to a registration with a wrong password after 20s")
		}
	})

	t.Run("groups file change applied live", func(t *testing.T) {
		const host = "reload.dev.local"
		s.register(t, srv, "keeper", groupName, basic, nil)
		if code, _ := get(t, srv, host, "/"); code != http.StatusBadGateway {
			t.Fatalf("unknown host before the change: got %d, want 502", code)
		}
		writeFile(t, srv.configDir, "groups.yml", []byte(groupsYAML+`  "reload":
    hosts: ["reload.dev.local"]
    authentication:
      bearer:
        token: "s3cret"
`))
		// The client retries an unknown group, so its registration is
		// the signal that the server has applied the new file.
		m := s.dial(t, srv, "reloaded", "reload", client.BearerAuthenticator("s3cret"), nil)
		select {
		case <-m.ready:
		case err := <-m.errc:
			t.Fatalf("registration in the new group: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("the new group was not applied within 30s")
		}
		if code, body := get(t, srv, host, "/x"); code != http.StatusOK || body != "reloaded /x" {
			t.Fatalf("new group: got %d %q, want 200 %q", code, body, "reloaded /x")
		}
		// The group that stayed kept its members.
		if code, body := get(t, srv, serverName, "/still"); code != http.StatusOK {
			t.Fatalf("old group after reload: %d %q", code, body)
		}
	})
}

func (s *suite) testMissingEnv(t *testing.T) {
	var env []string
	for _, kv := range baseEnv() {
		if !strings.HasPrefix(kv, "REVERST_SERVER_NAME=") {
			env = append(env, kv)
		}
	}
	srv := s.start(t, s.config(t), env)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, err := s.pool.Client.WaitContainerWithContext(srv.res.Container.ID, ctx)
	if err != nil {
		t.Fatalf("waiting for the container to exit: %v", err)
	}
	logs := s.logs(srv.res.Container.ID)
	if code == 0 {
		t.Fatalf("exit code 0 without REVERST_SERVER_NAME; logs:\n%s", logs)
	}
	if !strings.Contains(logs, "REVERST_SERVER_NAME") {
		t.Fatalf("exit code %d, but the logs do not name REVERST_SERVER_NAME:\n%s", code, logs)
	}
	t.Logf("exit code %d; logs: %s", code, strings.TrimSpace(logs))
}

func (s *suite) testStop(t *testing.T) {
	srv := s.start(t, s.config(t), baseEnv())
	waitReady(t, srv)

	started := make(chan struct{})
	release := make(chan struct{})
	var startOnce, releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	s.register(t, srv, "slow", groupName, client.BasicAuthenticator(username, password), func(w http.ResponseWriter, r *http.Request) {
		startOnce.Do(func() { close(started) })
		<-release
		fmt.Fprint(w, "finished "+r.URL.Path)
	})

	type result struct {
		code int
		body string
		err  error
	}
	inflight := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, srv.httpURL+"/inflight", nil)
		req.Host = serverName
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			inflight <- result{err: err}
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		inflight <- result{code: resp.StatusCode, body: string(body), err: err}
	}()
	select {
	case <-started:
	case r := <-inflight:
		t.Fatalf("request ended before reaching the handler: %+v", r)
	case <-time.After(20 * time.Second):
		t.Fatal("request did not reach the handler within 20s")
	}

	begin := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- s.pool.Client.StopContainer(srv.res.Container.ID, uint(stopGrace/time.Second)) }()

	// The frontend stops accepting connections when shutdown begins;
	// only then is the in-flight request let go, so that it is really in
	// flight during the shutdown. Probes use an unknown host (502 while
	// serving) so that they never reach the blocked handler.
	waitFrontendClosed(t, srv)
	unblock()

	select {
	case r := <-inflight:
		if r.err != nil || r.code != http.StatusOK || r.body != "finished /inflight" {
			t.Fatalf("in-flight request during shutdown: code %d body %q err %v; want 200 %q", r.code, r.body, r.err, "finished /inflight")
		}
	case <-time.After(stopGrace):
		t.Fatal("in-flight request not completed within the grace period")
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("docker stop: %v", err)
		}
	case <-time.After(stopGrace + 10*time.Second):
		t.Fatal("docker stop did not return")
	}
	elapsed := time.Since(begin)
	c, err := s.pool.Client.InspectContainer(srv.res.Container.ID)
	if err != nil {
		t.Fatal(err)
	}
	if c.State.Running || c.State.ExitCode != 0 {
		t.Fatalf("after docker stop: running %v, exit code %d (137 means killed after the grace period)", c.State.Running, c.State.ExitCode)
	}
	if elapsed >= stopGrace {
		t.Fatalf("stopped after %v, not within the %v grace period", elapsed, stopGrace)
	}
	t.Logf("stopped with exit code 0 in %v", elapsed.Round(time.Millisecond))
}

// waitFrontendClosed polls the HTTP frontend with new connections until
// they fail, which is what the start of a graceful shutdown looks like
// through docker-proxy.
func waitFrontendClosed(t *testing.T, srv *server) {
	t.Helper()
	probe := &http.Client{
		Transport: &http.Transport{DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	deadline := time.Now().Add(stopGrace)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest(http.MethodGet, srv.httpURL+"/probe", nil)
		req.Host = "probe.invalid"
		resp, err := probe.Do(req)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("probe timed out: %v", err)
			}
			return
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("probe for an unknown host: %d, want 502", resp.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the HTTP frontend still accepts connections %v after docker stop", stopGrace)
}
