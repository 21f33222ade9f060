package faults

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/internal/testpki"
)

const (
	serverName = "tunnel.test" // the name the server's certificate covers
	group      = "svc"
	host       = "svc.test" // the Host visitors use
	username   = "user"
	password   = "pass"

	startTimeout = 15 * time.Second
	// clockTick is Linux's USER_HZ, the unit of utime and stime in
	// /proc/PID/stat on every architecture Go supports.
	clockTick = 10 * time.Millisecond
)

// binaries are built once per test binary by TestMain.
type binaries struct{ server, member string }

var bins binaries

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "reverst-faults-")
	if err != nil {
		slog.Error("temp dir", "error", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Not built with -race: the processes are measured (CPU, RSS,
	// latency), and the packages they run have their own race tests.
	build := exec.Command("go", "build", "-o", dir+string(os.PathSeparator),
		"github.com/reverst-dev/reverst/cmd/reverst",
		"github.com/reverst-dev/reverst/e2e/faults/member")
	if out, err := build.CombinedOutput(); err != nil {
		slog.Error("building the server and the member", "error", err, "output", string(out))
		return 1
	}
	bins = binaries{server: filepath.Join(dir, "reverst"), member: filepath.Join(dir, "member")}
	return m.Run()
}

// writePKI writes a self-signed certificate for serverName and its key.
func writePKI(t *testing.T, dir string) (certPath, keyPath string) {
	t.Helper()
	return testpki.New(t, serverName).WriteFiles(t, dir)
}

// proc is a child process whose output goes to a log file.
type proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	err     error // valid once exited is closed
}

func (p *proc) start(t *testing.T, bin string, args []string, stdout io.Writer) {
	t.Helper()
	logFile, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stderr = logFile
	p.cmd.Stdout = logFile
	if stdout != nil {
		p.cmd.Stdout = stdout
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	p.exited = exited
	cmd := p.cmd
	go func() {
		p.err = cmd.Wait()
		close(exited)
	}()
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// signal sends sig to the process.
func (p *proc) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("%s: signal %v: %v", p.name, sig, err)
	}
}

// wait waits up to within for the process to exit and returns its exit
// error (nil for status 0).
func (p *proc) wait(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(within):
		p.kill()
		t.Fatalf("%s did not exit within %v", p.name, within)
		return nil
	}
}

// logTail returns the last lines of the process's log.
func (p *proc) logTail(lines int) string {
	b, _ := os.ReadFile(p.logPath)
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// cleanup stops the process at the end of the test and shows its log if
// the test failed.
func (p *proc) cleanup(t *testing.T) {
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("--- %s log (tail) ---\n%s", p.name, p.logTail(60))
		}
	})
}

// server is a reverst server process.
type server struct {
	proc
	dir                    string
	caPath                 string
	args                   []string
	tunnel, frontend, mgmt string
	mc                     *http.Client // management API, one kept-alive connection
	readyAt                time.Time    // when /readyz first answered 200
	startedAt              time.Time
}

// startServer starts a server for the group svc (hosts svc.test, basic
// authentication) on fresh loopback ports.
func startServer(t *testing.T) *server {
	t.Helper()
	dir := t.TempDir()
	certPath, keyPath := writePKI(t, dir)
	groupsPath := filepath.Join(dir, "groups.yml")
	groupsYAML := fmt.Sprintf("groups:\n  %q:\n    hosts: [%q]\n    authentication:\n      basic: {username: %q, password: %q}\n", group, host, username, password)
	if err := os.WriteFile(groupsPath, []byte(groupsYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	at := func(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
	httpPort, mgmtPort := testnet.Port(t, testnet.TCP), testnet.Port(t, testnet.TCP)
	for mgmtPort == httpPort {
		mgmtPort = testnet.Port(t, testnet.TCP)
	}
	s := &server{
		proc:     proc{name: "server", logPath: filepath.Join(dir, "server.log")},
		dir:      dir,
		caPath:   certPath,
		tunnel:   at(testnet.Port(t, testnet.Tunnel)),
		frontend: at(httpPort),
		mgmt:     at(mgmtPort),
		mc: &http.Client{
			Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true},
			Timeout:   5 * time.Second,
		},
	}
	s.args = []string{
		"--log", "info",
		"--tunnel-address", s.tunnel,
		"--http-address", s.frontend,
		"--management-address", s.mgmt,
		"--server-name", serverName,
		"--certificate-path", certPath,
		"--private-key-path", keyPath,
		"--tunnel-groups", groupsPath,
		"--shutdown-timeout", "5s",
	}
	s.cleanup(t)
	t.Cleanup(s.mc.CloseIdleConnections)
	s.start(t)
	return s
}

// start (re)starts the process on the same ports and waits until ready.
func (s *server) start(t *testing.T) {
	t.Helper()
	s.mc.CloseIdleConnections()
	s.startedAt = time.Now()
	s.proc.start(t, bins.server, s.args, nil)
	// No signal crosses the process boundary: poll /readyz.
	deadline := time.Now().Add(startTimeout)
	for {
		resp, err := s.mc.Get("http://" + s.mgmt + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				s.readyAt = time.Now()
				return
			}
		}
		select {
		case <-s.exited:
			t.Fatalf("server exited while starting: %v\n%s", s.err, s.logTail(30))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not ready within %v:\n%s", startTimeout, s.logTail(30))
		}
	}
}

// memberStatus mirrors an entry of the management API's /status.
type memberStatus struct {
	RemoteAddr string    `json:"remoteAddr"`
	Since      time.Time `json:"since"`
	InFlight   int64     `json:"inFlight"`
	Draining   bool      `json:"draining"`
}

// members returns the members of the group svc from /status.
func (s *server) members(t *testing.T) []memberStatus {
	t.Helper()
	resp, err := s.mc.Get("http://" + s.mgmt + "/status")
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	defer resp.Body.Close()
	var st struct {
		Groups []struct {
			Name    string         `json:"name"`
			Members []memberStatus `json:"members"`
		} `json:"groups"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	for _, g := range st.Groups {
		if g.Name == group {
			return g.Members
		}
	}
	t.Fatalf("GET /status: no group %q in %+v", group, st)
	return nil
}

// goroutines reads go_goroutines from /metrics.
func (s *server) goroutines(t *testing.T) int {
	t.Helper()
	resp, err := s.mc.Get("http://" + s.mgmt + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("go_goroutines %q: %v", v, err)
			}
			return int(n)
		}
	}
	t.Fatalf("no go_goroutines in /metrics (%v)", sc.Err())
	return 0
}

// peakRSS is the process's VmHWM.
func (p *proc) peakRSS(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/PID/status")
	return 0
}

// cpuTime is the CPU the process used so far (user + system).
func (p *proc) cpuTime(t *testing.T) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid()))
	if err != nil {
		t.Fatal(err)
	}
	// The command name may hold spaces; the fields after it do not.
	i := strings.LastIndexByte(string(b), ')')
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatalf("/proc/PID/stat: %v", err)
	}
	return time.Duration(utime+stime) * clockTick
}

// awaitMembers polls /status until ok accepts the members, and returns
// when it did.
func (s *server) awaitMembers(t *testing.T, within time.Duration, what string, ok func([]memberStatus) bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ms := s.members(t)
		if ok(ms) {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; members: %+v", what, within, ms)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// member is a member process.
type member struct {
	proc
	lines  chan string // its stdout, line by line
	port   string      // UDP port of its current registration
	direct string      // with -direct, its handler's own HTTP address
}

// startMember starts a member named name, with extra flags, and waits for
// its registration.
func startMember(t *testing.T, s *server, name string, extra ...string) *member {
	t.Helper()
	m := newMember(t, s, name, extra...)
	m.awaitRegistered(t, startTimeout)
	return m
}

// newMember starts a member named name, with extra flags, without waiting
// for its registration (with -direct, it waits for its direct address).
func newMember(t *testing.T, s *server, name string, extra ...string) *member {
	t.Helper()
	m := &member{
		proc:  proc{name: name, logPath: filepath.Join(s.dir, name+".log")},
		lines: make(chan string, 64),
	}
	r, w := io.Pipe()
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			m.lines <- sc.Text()
		}
		close(m.lines)
	}()
	m.start(t, bins.member, append([]string{
		"-tunnel", s.tunnel,
		"-ca", s.caPath,
		"-server-name", serverName,
		"-group", group,
		"-user", username,
		"-pass", password,
		"-name", name,
	}, extra...), w)
	go func() {
		<-m.exited
		_ = w.Close()
	}()
	m.cleanup(t)
	if slices.Contains(extra, "-direct") {
		m.direct = m.awaitLine(t, "direct ", startTimeout)
	}
	return m
}

// handlers asks the member, on its direct address, how many of its
// handlers of method (every method if empty) are running.
func (m *member) handlers(t *testing.T, hc *http.Client, method string) int {
	t.Helper()
	resp, err := hc.Get("http://" + m.direct + "/running?method=" + method)
	if err != nil {
		t.Fatalf("%s: GET /running: %v", m.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	n, convErr := strconv.Atoi(string(b))
	if err != nil || convErr != nil {
		t.Fatalf("%s: GET /running: %q %v", m.name, b, errors.Join(err, convErr))
	}
	return n
}

// awaitLine waits for the next stdout line with prefix and returns the
// rest.
func (m *member) awaitLine(t *testing.T, prefix string, within time.Duration) string {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case line, ok := <-m.lines:
			if !ok {
				t.Fatalf("%s exited (%v) before printing %q", m.name, m.err, prefix)
			}
			if rest, found := strings.CutPrefix(line, prefix); found {
				return strings.TrimSpace(rest)
			}
		case <-deadline:
			t.Fatalf("%s: no %q line within %v", m.name, prefix, within)
		}
	}
}

// awaitRegistered waits for the member's next registration.
func (m *member) awaitRegistered(t *testing.T, within time.Duration) {
	t.Helper()
	addr := m.awaitLine(t, "registered ", within)
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s registered from %q: %v", m.name, addr, err)
	}
	m.port = port
}

// in reports whether ms lists the member's current registration.
func (m *member) in(ms []memberStatus) (memberStatus, bool) {
	for _, st := range ms {
		if _, port, _ := net.SplitHostPort(st.RemoteAddr); port == m.port {
			return st, true
		}
	}
	return memberStatus{}, false
}

// visitors returns an HTTP client for load on the frontend.
func visitors(t *testing.T, conns int) *http.Client {
	hc := &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: conns, DisableCompression: true},
		Timeout:   15 * time.Second,
	}
	t.Cleanup(hc.CloseIdleConnections)
	return hc
}

// get sends a GET with Host svc.test and returns the status and body.
func get(ctx context.Context, hc *http.Client, s *server, path string) (int, string, error) {
	status, _, body, err := fetch(ctx, hc, s, path)
	return status, body, err
}

// fetch is get that also returns the member that answered.
func fetch(ctx context.Context, hc *http.Client, s *server, path string) (status int, member, body string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.frontend+path, nil)
	if err != nil {
		return 0, "", "", err
	}
	req.Host = host
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Member"), string(b), err
}

// result is one request of a load.
type result struct {
	start  time.Time
	dur    time.Duration
	member string // who answered (header X-Member)
	err    error  // transport error, truncated body or a status other than 200
}

// load is a steady stream of GETs from a few workers, each sending its next
// request as soon as the previous one is answered.
type load struct {
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	sent    atomic.Int64
	mu      sync.Mutex
	results []result
}

func startLoad(t *testing.T, s *server, workers int, path string) *load {
	t.Helper()
	hc := visitors(t, workers)
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for ctx.Err() == nil {
				start := time.Now()
				l.sent.Add(1)
				// Requests are not cut by the stop: every request sent
				// counts, so it must get its answer.
				status, member, body, err := fetch(context.WithoutCancel(ctx), hc, s, path)
				if err == nil && status != http.StatusOK {
					err = fmt.Errorf("status %d: %q", status, body)
				}
				r := result{start: start, dur: time.Since(start), member: member, err: err}
				l.mu.Lock()
				l.results = append(l.results, r)
				l.mu.Unlock()
			}
		}()
	}
	t.Cleanup(l.stop)
	return l
}

// stop ends the load and waits for the requests in flight.
func (l *load) stop() {
	l.cancel()
	l.wg.Wait()
}

// summary stops the load, logs its counts and returns its results.
func (l *load) summary(t *testing.T) []result {
	t.Helper()
	l.stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	var failed int
	byMember := map[string]int{}
	var maxDur time.Duration
	for _, r := range l.results {
		maxDur = max(maxDur, r.dur)
		if r.err != nil {
			failed++
			if failed <= 10 {
				t.Logf("failed request (started %s, took %v): %v", r.start.Format("15:04:05.000"), r.dur.Round(time.Millisecond), r.err)
			}
			continue
		}
		byMember[r.member]++
	}
	t.Logf("load: sent %d, failed %d, by member %v, slowest %v", len(l.results), failed, byMember, maxDur.Round(time.Millisecond))
	return l.results
}

func failures(rs []result) int {
	n := 0
	for _, r := range rs {
		if r.err != nil {
			n++
		}
	}
	return n
}

// startMembers starts a member per name and waits until the server lists
// them all and each has answered a request.
func startMembers(t *testing.T, s *server, names ...string) []*member {
	t.Helper()
	ms := make([]*member, 0, len(names))
	for _, name := range names {
		ms = append(ms, startMember(t, s, name))
	}
	awaitGroup(t, s, ms)
	return ms
}

// awaitGroup waits until the server lists exactly ms and each has answered
// a request.
func awaitGroup(t *testing.T, s *server, ms []*member) {
	t.Helper()
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = m.name
	}
	s.awaitMembers(t, 5*time.Second, fmt.Sprintf("%d members", len(names)), func(st []memberStatus) bool { return len(st) == len(names) })
	reach(t, s, names, 5*time.Second)
}

// reach sends GETs to /id until every named member answered, and returns
// how many it sent and how many of them failed.
func reach(t *testing.T, s *server, names []string, within time.Duration) (sent, failed int) {
	t.Helper()
	hc := visitors(t, 1)
	defer hc.CloseIdleConnections()
	seen := map[string]bool{}
	deadline := time.Now().Add(within)
	for len(seen) < len(names) {
		sent++
		status, body, err := get(t.Context(), hc, s, "/id")
		ok := err == nil && status == http.StatusOK
		if ok {
			seen[body] = true
		} else {
			failed++
		}
		// Answers from the same members only must not keep it going.
		if len(seen) < len(names) && time.Now().After(deadline) {
			t.Fatalf("reached %v within %v, want %v (last: %d %q %v)", seen, within, names, status, body, err)
		}
		if !ok {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return sent, failed
}
