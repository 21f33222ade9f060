package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/reverst-dev/reverst/app"
)

// Names shared by the bench, its server and its members.
const (
	benchGroup    = "bench"
	benchHost     = "bench.local"
	idleGroup     = "idle"
	idleHost      = "idle.local"
	benchUser     = "bench"
	benchPassword = "bench-password"
	serverName    = "localhost"
)

// cpuProfileEnv names the CPU profile a re-executed server or member
// writes when it stops.
const cpuProfileEnv = "REVERST_BENCH_CPUPROFILE"

// files are the server's generated certificate, key and groups file.
type files struct {
	dir, cert, key, groups string
}

func writeFiles(dir string) (*files, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: serverName},
		DNSNames:              []string{serverName},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	f := &files{dir: dir, cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem"), groups: filepath.Join(dir, "groups.yml")}
	groups := fmt.Sprintf(`groups:
  %[1]s:
    hosts: [%[2]q]
    authentication:
      basic: {username: %[5]q, password: %[6]q}
  %[3]s:
    hosts: [%[4]q]
    authentication:
      basic: {username: %[5]q, password: %[6]q}
`, benchGroup, benchHost, idleGroup, idleHost, benchUser, benchPassword)
	for path, data := range map[string][]byte{
		f.cert:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		f.key:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		f.groups: []byte(groups),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// buildReverst builds cmd/reverst into dir. The package path, not a
// relative one, so that it works from any directory inside the module.
func buildReverst(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "reverst")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/reverst-dev/reverst/cmd/reverst")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building cmd/reverst: %w\n%s", err, out)
	}
	return bin, nil
}

// freePort returns a loopback address that was free a moment ago: for
// "tunnel", free for both UDP (QUIC) and TCP (data connections).
func freePort(network string) (string, error) {
	if network != "tunnel" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		defer l.Close()
		return l.Addr().String(), nil
	}
	for range 50 {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		addr := c.LocalAddr().String()
		l, err := net.Listen("tcp", addr)
		c.Close()
		if err == nil {
			l.Close()
			return addr, nil
		}
	}
	return "", errors.New("no loopback port free for both UDP and TCP")
}

// tunnelServer is a running reverst process.
type tunnelServer struct {
	*proc
	tunnelAddr string // QUIC
	httpAddr   string // frontend
	mgmtAddr   string
	pprofAddr  string // net/http/pprof, in the server role only
}

// startServer starts reverst: bin, or this binary in the server role when
// profile is set (then with a CPU profile written to profile).
func startServer(ctx context.Context, name, bin string, f *files, env []string, profile string) (*tunnelServer, error) {
	s := &tunnelServer{}
	var err error
	if s.tunnelAddr, err = freePort("tunnel"); err != nil {
		return nil, err
	}
	if s.httpAddr, err = freePort("tcp"); err != nil {
		return nil, err
	}
	if s.mgmtAddr, err = freePort("tcp"); err != nil {
		return nil, err
	}
	args := []string{
		"--log", "warn",
		"--server-name", serverName,
		"--certificate-path", f.cert,
		"--private-key-path", f.key,
		"--tunnel-groups", f.groups,
		"--tunnel-address", s.tunnelAddr,
		"--http-address", s.httpAddr,
		"--management-address", s.mgmtAddr,
	}
	// Every tunnel comes from 127.0.0.1: without this the per-IP
	// registration limit would make the idle measurement one of the
	// limiter. An environment variable, which older servers ignore.
	env = append([]string{"REVERST_REGISTRATION_RATE=0"}, env...)
	if profile != "" {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		bin = self
		env = append(env, roleEnv+"=server", cpuProfileEnv+"="+profile)
	}
	if s.proc, err = startProc(name, filepath.Join(f.dir, name+".log"), env, bin, args...); err != nil {
		return nil, err
	}
	if profile != "" {
		if s.pprofAddr, err = s.expect(ctx, "pprof ", 30*time.Second); err != nil {
			s.stop()
			return nil, err
		}
	}
	if err := s.waitReady(ctx, 30*time.Second); err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

func (s *tunnelServer) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get("http://" + s.mgmtAddr + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if !s.alive() {
			return fmt.Errorf("%s exited (see %s)", s.name, s.logf.Name())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %s: %v (see %s)", s.name, timeout, err, s.logf.Name())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// metrics reads the samples named by series (a metric name with its
// labels, as exposed) from the server's management API; missing ones are
// left out.
func (s *tunnelServer) metrics(series ...string) (map[string]float64, error) {
	resp, err := http.Get("http://" + s.mgmtAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := make(map[string]float64, len(series))
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || !slices.Contains(series, name) {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", name, err)
		}
		out[name] = v
	}
	return out, sc.Err()
}

// members reads the server's member count of group from its metrics.
func (s *tunnelServer) members(group string) (int, error) {
	name := fmt.Sprintf(`reverst_group_members{group=%q}`, group)
	m, err := s.metrics(name)
	return int(m[name]), err
}

// Go runtime metrics that explain what an idle tunnel costs.
var runtimeSeries = []string{"go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes"}

// waitMembers polls until group has n members.
func (s *tunnelServer) waitMembers(ctx context.Context, group string, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		got, err := s.members(group)
		if err == nil && got == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("group %s has %d members after %s, want %d (error: %v)", group, got, timeout, n, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// serverMain is the server role: the same app.Main as cmd/reverst, with a
// CPU profile around it.
func serverMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	stopProfile, err := startProfile()
	if err != nil {
		return err
	}
	// net/http/pprof's handlers, on their own loopback port, for heap
	// profiles taken at a chosen moment (the idle tunnels).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", httppprof.Index)
	pprofSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = pprofSrv.Serve(ln) }()
	defer pprofSrv.Close()
	fmt.Fprintf(stdout, "pprof %s\n", ln.Addr())
	code := app.Main(ctx, args, stderr)
	if err := stopProfile(); err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("reverst exited with status %d", code)
	}
	return nil
}

// startProfile starts the CPU profile named by cpuProfileEnv, if any, and
// returns the function that writes it, and an allocation profile beside it.
func startProfile() (func() error, error) {
	path := os.Getenv(cpuProfileEnv)
	if path == "" {
		return func() error { return nil }, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return err
		}
		// The allocations since the start, beside the CPU profile: most
		// of a small request's cost is garbage.
		a, err := os.Create(strings.TrimSuffix(path, ".pprof") + ".allocs.pprof")
		if err != nil {
			return err
		}
		if err := pprof.Lookup("allocs").WriteTo(a, 0); err != nil {
			a.Close()
			return err
		}
		return a.Close()
	}, nil
}

// saveHeapProfile writes the server's heap profile, after a GC, to path.
// It needs the server role (a profiled server).
func (s *tunnelServer) saveHeapProfile(path string) error {
	if s.pprofAddr == "" {
		return errors.New("heap profile: the server is not profiled")
	}
	resp, err := http.Get("http://" + s.pprofAddr + "/debug/pprof/heap?gc=1")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("heap profile: %s", resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
