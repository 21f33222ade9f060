// Package kubetest starts a real etcd and kube-apiserver on loopback for
// tests that need a Kubernetes API: no fake clientset, real RBAC. It knows
// two users: an admin (system:masters) and an unprivileged user with no
// rights beyond discovery, to bind to the RBAC rules under test.
//
// One cluster per test binary is enough and keeps suites fast:
//
//	var cluster kubetest.Shared
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		cluster.Stop()
//		os.Exit(code)
//	}
//
//	func TestX(t *testing.T) { c := cluster.Get(t); ... }
//
// The binaries come from REVERST_KUBE_BIN (a directory holding etcd and
// kube-apiserver) or from the repository's .ci/kube-binaries, which builds
// them into a cache once (under go test -short only REVERST_KUBE_BIN is
// looked at). Without them a test fails when CI is set (not false or 0) and is skipped, with a
// warning on stderr, otherwise.
package kubetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// UserName is the unprivileged user of every cluster.
const UserName = "reverst-test"

// Cluster is a running etcd and kube-apiserver.
type Cluster struct {
	// Admin is a system:masters client configuration.
	Admin *rest.Config
	// User is the configuration of UserName, who may do nothing until a
	// test binds it to a role.
	User *rest.Config

	dir       string
	etcd      *process
	apiserver *process
}

// process is a started binary; exited is closed once it has been reaped.
type process struct {
	cmd    *exec.Cmd
	log    string
	exited chan struct{}
}

// ErrNoBinaries is wrapped when etcd or kube-apiserver cannot be found.
var ErrNoBinaries = errors.New("kubetest: etcd and kube-apiserver binaries unavailable")

// Start starts etcd and kube-apiserver from binDir and waits until the API
// server is ready. Stop them with Stop.
func Start(ctx context.Context, binDir string) (*Cluster, error) {
	etcdBin, apiBin := filepath.Join(binDir, "etcd"), filepath.Join(binDir, "kube-apiserver")
	for _, b := range []string{etcdBin, apiBin} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNoBinaries, err)
		}
	}
	dir, err := os.MkdirTemp("", "kubetest-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	if err := c.start(ctx, etcdBin, apiBin); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) start(ctx context.Context, etcdBin, apiBin string) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	clientURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	apiURL := "https://127.0.0.1:" + strconv.Itoa(ports[2])

	c.etcd, err = c.run(etcdBin, "etcd.log",
		"--name=default",
		"--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+clientURL,
		"--advertise-client-urls="+clientURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	if err := c.waitOK(ctx, c.etcd, clientURL+"/health", ""); err != nil {
		return err
	}

	if err := c.writeKeys(); err != nil {
		return err
	}
	adminToken, userToken := randomToken(), randomToken()
	tokens := fmt.Sprintf("%s,admin,admin,\"system:masters\"\n%s,%s,%s\n", adminToken, userToken, UserName, UserName)
	if err := os.WriteFile(filepath.Join(c.dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return err
	}
	c.apiserver, err = c.run(apiBin, "apiserver.log",
		"--etcd-servers="+clientURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--endpoint-reconciler-type=none",
		"--secure-port="+strconv.Itoa(ports[2]),
		"--cert-dir="+filepath.Join(c.dir, "certs"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(c.dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(c.dir, "sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--token-auth-file="+filepath.Join(c.dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	if err := c.waitOK(ctx, c.apiserver, apiURL+"/readyz", adminToken); err != nil {
		return err
	}
	config := func(token string) *rest.Config {
		return &rest.Config{
			Host:            apiURL,
			BearerToken:     token,
			TLSClientConfig: rest.TLSClientConfig{Insecure: true},
			QPS:             100,
			Burst:           200,
		}
	}
	c.Admin, c.User = config(adminToken), config(userToken)
	return nil
}

// run starts bin with its output in logName under the cluster's directory.
func (c *Cluster) run(bin, logName string, args ...string) (*process, error) {
	log, err := os.Create(filepath.Join(c.dir, logName))
	if err != nil {
		return nil, err
	}
	defer log.Close() // the child has its own descriptor
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = dieWithParent()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("kubetest: starting %s: %w", filepath.Base(bin), err)
	}
	p := &process{cmd: cmd, log: logName, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	return p, nil
}

// waitOK polls url until it answers 200, the process exits or a minute
// passes.
func (c *Cluster) waitOK(ctx context.Context, p *process, url, token string) error {
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
	}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.exited:
			return fmt.Errorf("kubetest: %s exited:\n%s", filepath.Base(p.cmd.Path), c.logTail(p.log))
		case <-ctx.Done():
			return fmt.Errorf("kubetest: %s not ready: %w\n%s", filepath.Base(p.cmd.Path), ctx.Err(), c.logTail(p.log))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) logTail(name string) string {
	data, _ := os.ReadFile(filepath.Join(c.dir, name))
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// writeKeys makes the service account signing key pair.
func (c *Cluster) writeKeys() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	priv := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(filepath.Join(c.dir, "sa.key"), priv, 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(c.dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644)
}

// Stop stops the API server, then etcd, and removes their files.
func (c *Cluster) Stop() {
	for _, p := range []*process{c.apiserver, c.etcd} {
		if p == nil {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	}
	_ = os.RemoveAll(c.dir)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close() // held until all are picked, so they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Binaries returns the directory holding etcd and kube-apiserver:
// REVERST_KUBE_BIN, else what the repository's .ci/kube-binaries prints
// (which builds them on first use: minutes, then answers at once).
func Binaries(ctx context.Context) (string, error) {
	if dir := os.Getenv("REVERST_KUBE_BIN"); dir != "" {
		return dir, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrNoBinaries, err)
	}
	script := filepath.Join(root, ".ci", "kube-binaries")
	cmd := exec.CommandContext(ctx, "bash", script)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tail := stderr.String()
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return "", fmt.Errorf("%w: %s: %w\n%s", ErrNoBinaries, script, err, tail)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1], nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Shared starts one Cluster on first use and hands it to every test of the
// binary. Its zero value is ready; call Stop from TestMain after m.Run.
type Shared struct {
	once    sync.Once
	cluster *Cluster
	err     error
}

// Get returns the shared cluster, starting it on first use. When it cannot
// be had, Get fails the test if CI=true and otherwise skips it with a
// warning on stderr; a cluster that does not start with binaries at hand
// fails the test everywhere.
func (s *Shared) Get(t testing.TB) *Cluster {
	t.Helper()
	ci := isCI()
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		if !ci && testing.Short() && os.Getenv("REVERST_KUBE_BIN") == "" {
			// A quick run does not wait for a build of several minutes.
			s.err = fmt.Errorf("%w: not looked for under -short (set REVERST_KUBE_BIN)", ErrNoBinaries)
			return
		}
		dir, err := Binaries(ctx)
		if err != nil {
			s.err = err
			return
		}
		s.cluster, s.err = Start(ctx, dir)
	})
	if s.err == nil {
		return s.cluster
	}
	if ci || !errors.Is(s.err, ErrNoBinaries) {
		t.Fatal(s.err)
	}
	slog.New(slog.NewTextHandler(os.Stderr, nil)).Warn(
		"SKIPPING a test that needs a real Kubernetes API server (CI is not set; with CI=true this fails)",
		"test", t.Name(), "error", s.err)
	t.Skip(s.err)
	return nil
}

// Stop stops the shared cluster if it was started.
func (s *Shared) Stop() {
	if s.cluster != nil {
		s.cluster.Stop()
	}
}

// isCI reads CI the way .ci/test does: set, and not "false" or "0".
func isCI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "false" && v != "0"
}
