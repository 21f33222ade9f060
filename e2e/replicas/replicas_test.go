package replicas

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
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

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/internal/testpki"
)

const (
	serverName = "tunnel.test" // the name every replica's certificate covers
	group      = "svc"
	host       = "svc.test" // the Host visitors use
	username   = "user"
	password   = "pass"

	startTimeout = 15 * time.Second
)

var replicaIPs = []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}

// buildServer builds ./cmd/reverst into a temporary directory.
func buildServer(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "reverst")
	out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/reverst-dev/reverst/cmd/reverst").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/reverst: %v\n%s", err, out)
	}
	return bin
}

// writePKI writes a self-signed certificate for serverName and its key,
// and returns their paths with a pool trusting the certificate.
func writePKI(t *testing.T, dir string) (certPath, keyPath string, pool *x509.CertPool) {
	t.Helper()
	pki := testpki.New(t, serverName)
	certPath, keyPath = pki.WriteFiles(t, dir)
	return certPath, keyPath, pki.Pool
}

// replica is one reverst server process.
type replica struct {
	t        *testing.T
	ip       string
	bin      string
	args     []string
	mgmt     string // management address
	frontend string // HTTP frontend address
	logPath  string

	cmd    *exec.Cmd
	exited chan struct{}
}

// start runs the process and waits until it is ready.
func (r *replica) start() {
	r.t.Helper()
	logFile, err := os.OpenFile(r.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		r.t.Fatal(err)
	}
	defer logFile.Close()
	r.cmd = exec.Command(r.bin, r.args...)
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	exited := make(chan struct{})
	r.exited = exited
	go func() {
		_ = r.cmd.Wait()
		close(exited)
	}()

	// No signal crosses the process boundary: poll /readyz, briefly.
	deadline := time.Now().Add(startTimeout)
	for {
		resp, err := http.Get("http://" + r.mgmt + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-exited:
			r.t.Fatalf("replica %s exited while starting:\n%s", r.ip, r.logs())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("replica %s not ready in %v:\n%s", r.ip, startTimeout, r.logs())
		}
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (r *replica) kill() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.exited
}

func (r *replica) logs() string {
	b, _ := os.ReadFile(r.logPath)
	return string(b)
}

// startReplicas starts the three server processes and returns them with
// the tunnel address clients dial and a pool trusting the servers.
func startReplicas(t *testing.T) ([]*replica, string, *x509.CertPool) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("needs 127.0.0.2 and 127.0.0.3 on the loopback interface, as Linux has")
	}
	bin := buildServer(t)
	dir := t.TempDir()
	certPath, keyPath, pool := writePKI(t, dir)
	groupsPath := filepath.Join(dir, "groups.yml")
	groupsYAML := fmt.Sprintf("groups:\n  %q:\n    hosts: [%q]\n    authentication:\n      basic: {username: %q, password: %q}\n", group, host, username, password)
	if err := os.WriteFile(groupsPath, []byte(groupsYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	tunnelPort, httpPort, mgmtPort := testnet.Port(t, testnet.Tunnel, replicaIPs...), testnet.Port(t, testnet.TCP, replicaIPs...), testnet.Port(t, testnet.TCP, replicaIPs...)
	for mgmtPort == httpPort {
		mgmtPort = testnet.Port(t, testnet.TCP, replicaIPs...)
	}

	var replicas []*replica
	for i, ip := range replicaIPs {
		at := func(port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }
		r := &replica{
			t:        t,
			ip:       ip,
			bin:      bin,
			mgmt:     at(mgmtPort),
			frontend: at(httpPort),
			logPath:  filepath.Join(dir, fmt.Sprintf("replica-%d.log", i+1)),
			args: []string{
				"--log", "debug",
				"--tunnel-address", at(tunnelPort),
				"--http-address", at(httpPort),
				"--management-address", at(mgmtPort),
				"--server-name", serverName,
				"--certificate-path", certPath,
				"--private-key-path", keyPath,
				"--tunnel-groups", groupsPath,
			},
		}
		t.Cleanup(func() {
			r.kill()
			if t.Failed() {
				t.Logf("replica %s log:\n%s", r.ip, r.logs())
			}
		})
		replicas = append(replicas, r)
	}
	for _, r := range replicas {
		r.start()
	}
	return replicas, net.JoinHostPort(serverName, strconv.Itoa(tunnelPort)), pool
}

// headless resolves serverName to every replica, as a headless Service's
// DNS record does.
type headless struct{}

func (headless) LookupNetIP(_ context.Context, _, name string) ([]netip.Addr, error) {
	if name != serverName {
		return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
	}
	addrs := make([]netip.Addr, len(replicaIPs))
	for i, ip := range replicaIPs {
		addrs[i] = netip.MustParseAddr(ip)
	}
	return addrs, nil
}

// registration is a client's connection to one replica.
type registration struct{ client, ip string }

// startClient runs a client named name that answers with its name, and
// reports each registration on ready.
func startClient(t *testing.T, name, addr string, pool *x509.CertPool, ready chan<- registration) {
	t.Helper()
	srv := &client.Server{
		TunnelGroup: group,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s", name, r.URL.Path)
		}),
		TLSConfig:       &tls.Config{RootCAs: pool},
		Authenticator:   client.BasicAuthenticator(username, password),
		Resolver:        headless{},
		ResolveInterval: 200 * time.Millisecond,
		MinBackoff:      50 * time.Millisecond,
		MaxBackoff:      500 * time.Millisecond,
		Logger:          slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("client", name),
		OnConnectionReady: func(ci client.ConnectionInfo) {
			ip := ci.RemoteAddr.(*net.UDPAddr).IP.String()
			ready <- registration{name, ip}
		},
	}
	done := make(chan error, 1)
	go func() { done <- srv.DialAndServe(context.Background(), addr) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("client %s Shutdown: %v", name, err)
		}
		if err := <-done; !errors.Is(err, client.ErrServerClosed) {
			t.Errorf("client %s DialAndServe = %v", name, err)
		}
	})
}

// testWriter sends log lines to t.Log, so that they show on failure or
// with -v only.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// awaitRegistrations waits until every (client, ip) pair in want has
// registered.
func awaitRegistrations(t *testing.T, ready <-chan registration, want map[registration]bool, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for len(want) > 0 {
		select {
		case r := <-ready:
			delete(want, r)
		case <-deadline:
			t.Fatalf("not registered within %v: %v", within, want)
		}
	}
}

// load counts the requests sent through one replica.
type load struct {
	sent, failed atomic.Int64
	firstErr     atomic.Pointer[string]
}

func (l *load) fail(err string) {
	l.failed.Add(1)
	l.firstErr.CompareAndSwap(nil, &err)
}

// get sends one GET with the group's Host through frontend and returns the
// body of a 200.
func get(hc *http.Client, frontend string) (string, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+frontend+"/load", nil)
	if err != nil {
		return "", err
	}
	req.Host = host
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d: %q", resp.StatusCode, body)
	}
	return string(body), nil
}

// reachesAll sends requests through frontend until both clients answered.
func reachesAll(t *testing.T, hc *http.Client, frontend string, clients []string, within time.Duration) {
	t.Helper()
	seen := map[string]bool{}
	deadline := time.Now().Add(within)
	for len(seen) < len(clients) {
		body, err := get(hc, frontend)
		if err == nil {
			seen[strings.Fields(body)[0]] = true
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("through %s reached %v within %v, want %v (last error: %v)", frontend, seen, within, clients, err)
		}
	}
}

func TestKillReplicaUnderLoad(t *testing.T) {
	replicas, addr, pool := startReplicas(t)
	clients := []string{"client-a", "client-b"}
	ready := make(chan registration, 64)
	want := map[registration]bool{}
	for _, name := range clients {
		startClient(t, name, addr, pool, ready)
		for _, ip := range replicaIPs {
			want[registration{name, ip}] = true
		}
	}
	awaitRegistrations(t, ready, want, startTimeout)

	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	for _, r := range replicas {
		reachesAll(t, hc, r.frontend, clients, 5*time.Second)
	}

	// Two workers per replica send GETs until stopped.
	loads := make([]*load, len(replicas))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, r := range replicas {
		loads[i] = &load{}
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					loads[i].sent.Add(1)
					if _, err := get(hc, r.frontend); err != nil {
						loads[i].fail(err.Error())
						if i == 0 {
							// Expected while replica 1 is down; do not spin.
							time.Sleep(10 * time.Millisecond)
						}
					}
				}
			})
		}
	}
	stopLoad := sync.OnceFunc(func() {
		close(stop)
		wg.Wait()
	})
	defer stopLoad()

	// until waits, bounded, for the others to have served n more requests.
	until := func(n int64, what string) {
		t.Helper()
		base := []int64{loads[1].sent.Load(), loads[2].sent.Load()}
		deadline := time.Now().Add(10 * time.Second)
		for loads[1].sent.Load()-base[0] < n || loads[2].sent.Load()-base[1] < n {
			if time.Now().After(deadline) {
				t.Fatalf("load too slow %s: %d and %d requests", what, loads[1].sent.Load()-base[0], loads[2].sent.Load()-base[1])
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	until(50, "before the kill")

	replicas[0].kill()
	killed := time.Now()
	until(200, "after the kill")

	replicas[0].start()
	restarted := time.Now()
	want = map[registration]bool{}
	for _, name := range clients {
		want[registration{name, replicaIPs[0]}] = true
	}
	awaitRegistrations(t, ready, want, 20*time.Second)
	reattached := time.Since(restarted)
	reachesAll(t, hc, replicas[0].frontend, clients, 5*time.Second)
	until(50, "after the restart")
	stopLoad()

	t.Logf("replica 1 down for %v; clients reattached %v after it came back", restarted.Sub(killed).Round(time.Millisecond), reattached.Round(time.Millisecond))
	for i, l := range loads {
		first := ""
		if p := l.firstErr.Load(); p != nil {
			first = " first error: " + *p
		}
		t.Logf("through replica %d (%s): sent %d, failed %d%s", i+1, replicaIPs[i], l.sent.Load(), l.failed.Load(), first)
	}
	for i, l := range loads[1:] {
		if n := l.failed.Load(); n != 0 {
			t.Errorf("replica %d: %d of %d requests failed while replica 1 was killed, want 0", i+2, n, l.sent.Load())
		}
	}
}
