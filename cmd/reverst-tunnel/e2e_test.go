package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/internal/testpki"
)

// These tests run the built binaries: cmd/reverst as the tunnel server and
// cmd/reverst-tunnel in front of an httptest backend, and send visitors'
// requests to the server's HTTP frontend.

const (
	e2eGroup   = "svc"
	e2eHost    = "svc.test"
	e2eTimeout = 15 * time.Second
)

// goBuild builds the main package pkg into dir.
func goBuild(t *testing.T, dir, pkg string) string {
	t.Helper()
	bin := filepath.Join(dir, filepath.Base(pkg))
	out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// writeCert writes a self-signed certificate for localhost and its key.
func writeCert(t *testing.T, dir string) (certPath, keyPath string) {
	t.Helper()
	return testpki.New(t, "localhost").WriteFiles(t, dir)
}

// process is a running binary whose stderr the test reads line by line.
type process struct {
	t      *testing.T
	cmd    *exec.Cmd
	lines  chan string
	mu     sync.Mutex
	stderr strings.Builder
	exited chan struct{}
	err    error // of Wait, once exited is closed
}

func startProcess(t *testing.T, bin string, env []string, args ...string) *process {
	t.Helper()
	p := &process{t: t, lines: make(chan string, 1024), exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = env
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			p.mu.Lock()
			p.stderr.WriteString(s.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- s.Text():
			default:
			}
		}
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("%s stderr:\n%s", filepath.Base(bin), p.output())
		}
	})
	return p
}

func (p *process) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// waitFor waits for a stderr line containing substr.
func (p *process) waitFor(substr string) {
	p.t.Helper()
	deadline := time.After(e2eTimeout)
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, substr) {
				return
			}
		case <-p.exited:
			p.t.Fatalf("exited (%v) before logging %q", p.err, substr)
		case <-deadline:
			p.t.Fatalf("no stderr line containing %q within %v", substr, e2eTimeout)
		}
	}
}

// exitCode waits for the process to exit and returns its status.
func (p *process) exitCode() int {
	p.t.Helper()
	select {
	case <-p.exited:
	case <-time.After(e2eTimeout):
		p.t.Fatalf("still running after %v", e2eTimeout)
	}
	var exitErr *exec.ExitError
	if errors.As(p.err, &exitErr) {
		return exitErr.ExitCode()
	}
	if p.err != nil {
		p.t.Fatalf("wait: %v", p.err)
	}
	return 0
}

// cleanEnv is the test's environment without REVERST_* settings.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envPrefix) {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

func TestBinaryEndToEnd(t *testing.T) {
	dir := t.TempDir()
	serverBin := goBuild(t, dir, "github.com/reverst-dev/reverst/cmd/reverst")
	cliBin := goBuild(t, dir, "github.com/reverst-dev/reverst/cmd/reverst-tunnel")
	certPath, keyPath := writeCert(t, dir)
	groupsPath := filepath.Join(dir, "groups.yml")
	groupsYAML := fmt.Sprintf("groups:\n  %q:\n    hosts: [%q]\n    authentication:\n      basic: {username: user, password: pass}\n", e2eGroup, e2eHost)
	if err := os.WriteFile(groupsPath, []byte(groupsYAML), 0o600); err != nil {
		t.Fatal(err)
	}

	tunnelAddr, frontend, mgmt := testnet.Addr(t, testnet.Tunnel), testnet.Addr(t, testnet.TCP), testnet.Addr(t, testnet.TCP)
	server := startProcess(t, serverBin, cleanEnv(),
		"--tunnel-address", tunnelAddr, "--http-address", frontend, "--management-address", mgmt,
		"--server-name", "localhost", "--certificate-path", certPath, "--private-key-path", keyPath,
		"--tunnel-groups", groupsPath)
	server.waitFor("accepting tunnels")
	_, port, _ := net.SplitHostPort(tunnelAddr)
	// A name, resolved by the real resolver, verified as that name.
	cliAddr := net.JoinHostPort("localhost", port)

	visit := func(path string) (int, string, error) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+frontend+path, nil)
		req.Host = e2eHost
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}

	t.Run("serves and drains", func(t *testing.T) {
		started, release := make(chan struct{}), make(chan struct{})
		backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/slow":
				close(started)
				<-release
			case "/ws":
				serveEcho(t, w, r)
				return
			}
			fmt.Fprintf(w, "backend host=%s path=%s", r.Host, r.URL.Path)
		}))
		defer backend.Close()

		cli := startProcess(t, cliBin, cleanEnv("REVERST_PASSWORD=pass", "REVERST_LOG=debug"),
			"-a", cliAddr, "-g", e2eGroup, "--ca", certPath, "--username", "user", "http", backend.Listener.Addr().String())
		cli.waitFor("tunnel registered")

		code, body, err := visit("/hello")
		if err != nil || code != http.StatusOK || body != "backend host="+e2eHost+" path=/hello" {
			t.Fatalf("GET /hello = %d %q %v", code, body, err)
		}
		cli.waitFor("msg=request")
		// A WebSocket-like upgrade, through the server's frontend, the
		// tunnel and the command's proxy.
		echoUpgrade(t, frontend, e2eHost)

		type result struct {
			code int
			body string
			err  error
		}
		slow := make(chan result, 1)
		go func() {
			code, body, err := visit("/slow")
			slow <- result{code, body, err}
		}()
		<-started
		if err := cli.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		cli.waitFor("shutting down")
		close(release)
		if r := <-slow; r.err != nil || r.code != http.StatusOK || r.body != "backend host="+e2eHost+" path=/slow" {
			t.Errorf("request in flight during SIGTERM = %+v, want a complete 200", r)
		}
		if code := cli.exitCode(); code != 0 {
			t.Errorf("exit status after SIGTERM = %d, want 0", code)
		}
		if code, body, err := visit("/gone"); err != nil || code == http.StatusOK {
			t.Errorf("GET after the client left = %d %q %v, want an error status", code, body, err)
		}
	})

	for _, tt := range []struct {
		name, group, password, want string
	}{
		{"wrong password", e2eGroup, "wrong", "unauthorized"},
		{"unknown group", "nope", "pass", "not found"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cli := startProcess(t, cliBin, cleanEnv("REVERST_PASSWORD="+tt.password),
				"-a", cliAddr, "-g", tt.group, "--ca", certPath, "-u", "user", "http", "8080")
			if code := cli.exitCode(); code != 1 {
				t.Errorf("exit status = %d, want 1", code)
			}
			out := cli.output()
			t.Logf("stderr:\n%s", out)
			if !strings.Contains(out, "reverst-tunnel: the tunnel server refused the registration: "+tt.want) {
				t.Errorf("stderr lacks the refusal %q:\n%s", tt.want, out)
			}
			if strings.Contains(out, tt.password) && tt.password != "pass" {
				t.Errorf("stderr shows the password:\n%s", out)
			}
		})
	}

	t.Run("usage error", func(t *testing.T) {
		cli := startProcess(t, cliBin, cleanEnv(), "http", "8080")
		if code := cli.exitCode(); code != 2 {
			t.Errorf("exit status = %d, want 2", code)
		}
		if out := cli.output(); !strings.Contains(out, "REVERST_TUNNEL_GROUP") {
			t.Errorf("stderr does not say what is missing:\n%s", out)
		}
	})
}
