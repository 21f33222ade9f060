package client_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/protocol"
)

// testResolver answers every lookup of testSNI with the addresses the test
// sets, standing in for a headless Service's DNS records.
type testResolver struct {
	mu      sync.Mutex
	addrs   []netip.Addr
	err     error
	lookups atomic.Int64
}

func (r *testResolver) set(addrs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addrs, r.err = nil, nil
	for _, a := range addrs {
		r.addrs = append(r.addrs, netip.MustParseAddr(a))
	}
}

func (r *testResolver) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addrs, r.err = nil, err
}

func (r *testResolver) LookupNetIP(_ context.Context, network, host string) ([]netip.Addr, error) {
	r.lookups.Add(1)
	if host != testSNI || network != "ip" {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.addrs), r.err
}

// replicas starts one test tunnel server on each of 127.0.0.1, .2 and .3,
// all on the same UDP port (Linux routes all of 127/8 to the loopback
// interface), and returns them with the address clients dial.
func replicas(t *testing.T) ([]*tunnelServer, string) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("needs 127.0.0.2 and 127.0.0.3 on the loopback interface, as Linux has")
	}
	pki := newPKI(t)
	ips := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}
	port := strconv.Itoa(testnet.Port(t, testnet.UDP, ips...))
	var servers []*tunnelServer
	for _, ip := range ips {
		servers = append(servers, newTunnelServerAt(t, pki, net.JoinHostPort(ip, port)))
	}
	return servers, net.JoinHostPort(testSNI, port)
}

// replicaClient returns a client that resolves testSNI with res.
func replicaClient(ts *tunnelServer, res *testResolver) (*client.Server, *logRecorder) {
	srv, rec := newClient(ts)
	srv.Resolver = res
	srv.ResolveInterval = 50 * time.Millisecond
	return srv, rec
}

func drained(t *testing.T, m *member) {
	t.Helper()
	select {
	case <-m.drained:
	case <-time.After(waitTimeout):
		t.Fatalf("connection to %s did not announce a drain", m.conn.LocalAddr())
	}
	if appErr := closedBy(t, m.conn); appErr.ErrorCode != protocol.CodeOK {
		t.Errorf("connection to %s closed with %v, want code 0", m.conn.LocalAddr(), appErr)
	}
}

func mustServe(t *testing.T, m *member) {
	t.Helper()
	if code, body := m.mustGet(t, "/r"); code != http.StatusOK || body != "Hello "+testHost+" /r" {
		t.Errorf("GET through %s = %d %q", m.conn.LocalAddr(), code, body)
	}
}

func TestReplicasFollowResolution(t *testing.T) {
	servers, addr := replicas(t)
	res := &testResolver{}
	res.set("127.0.0.1", "127.0.0.2")
	srv, _ := replicaClient(servers[0], res)
	var (
		mu      sync.Mutex
		readies []string
	)
	srv.OnConnectionReady = func(ci client.ConnectionInfo) {
		mu.Lock()
		defer mu.Unlock()
		if ci.Addr != addr {
			t.Errorf("ConnectionInfo.Addr = %q, want %q", ci.Addr, addr)
		}
		readies = append(readies, ci.RemoteAddr.String())
	}
	errc, _ := serve(t, srv, addr)

	m1, m2 := servers[0].member(t), servers[1].member(t)
	for _, m := range []*member{m1, m2} {
		// Every connection verifies the name, not the address.
		if m.sni != testSNI {
			t.Errorf("SNI at %s = %q, want %q", m.conn.LocalAddr(), m.sni, testSNI)
		}
		mustServe(t, m)
	}

	res.set("127.0.0.1", "127.0.0.2", "127.0.0.3")
	m3 := servers[2].member(t)
	mustServe(t, m3)

	res.set("127.0.0.1", "127.0.0.3")
	drained(t, m2)
	mustServe(t, m1)
	mustServe(t, m3)

	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	drained(t, m1)
	drained(t, m3)
	if err := result(t, errc, quickTimeout); !errors.Is(err, client.ErrServerClosed) {
		t.Errorf("DialAndServe = %v, want ErrServerClosed", err)
	}

	for i, want := range []int64{1, 1, 1} {
		if n := servers[i].attempts.Load(); n != want {
			t.Errorf("replica %d saw %d registrations, want %d", i+1, n, want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(readies)
	port := strconv.Itoa(int(netip.MustParseAddrPort(servers[0].addr).Port()))
	want := []string{"127.0.0.1:" + port, "127.0.0.2:" + port, "127.0.0.3:" + port}
	if !slices.Equal(readies, want) {
		t.Errorf("OnConnectionReady for %q, want %q", readies, want)
	}
}

func TestReplicaRefusalEndsDialAndServe(t *testing.T) {
	servers, addr := replicas(t)
	res := &testResolver{}
	res.set("127.0.0.1")
	srv, _ := replicaClient(servers[0], res)
	errc, _ := serve(t, srv, addr)
	m1 := servers[0].member(t)

	servers[1].setVerdict(func(*protocol.RegisterRequest) error { return protocol.ErrUnauthorized })
	res.set("127.0.0.1", "127.0.0.2")
	if err := result(t, errc, quickTimeout); !errors.Is(err, client.ErrUnauthorized) {
		t.Errorf("DialAndServe = %v, want ErrUnauthorized", err)
	}
	// Nothing is left serving.
	closedBy(t, m1.conn)
	if n := servers[1].attempts.Load(); n != 1 {
		t.Errorf("refusing replica saw %d registrations, want 1", n)
	}
}

func TestResolutionFailureIsRetried(t *testing.T) {
	servers, addr := replicas(t)
	res := &testResolver{}
	res.fail(&net.DNSError{Err: "server misbehaving", Name: testSNI, IsTemporary: true})
	srv, rec := replicaClient(servers[0], res)
	errc, _ := serve(t, srv, addr)

	rec.waitFor(t, "resolving tunnel address failed, retrying")
	res.set() // no records: not an error from the resolver, still nothing to dial
	rec.waitFor(t, "no addresses")
	select {
	case err := <-errc:
		t.Fatalf("DialAndServe gave up on resolution: %v", err)
	default:
	}
	res.set("127.0.0.2")
	mustServe(t, servers[1].member(t))
}

// A name that does not resolve yet when DialAndServe starts (a headless
// Service whose replicas are not ready) leaves nothing to dial but the
// name: looking it up is the connection attempt, and the tunnel is up
// within about MaxBackoff of the name resolving, not ResolveInterval.
func TestNameResolvingLateIsJoinedWithinMaxBackoff(t *testing.T) {
	ts := newTunnelServer(t)
	_, port, _ := net.SplitHostPort(ts.addr)
	res := &testResolver{}
	res.set() // no records yet
	srv, rec := replicaClient(ts, res)
	srv.MinBackoff, srv.MaxBackoff = 10*time.Millisecond, 100*time.Millisecond
	srv.ResolveInterval = time.Hour
	serve(t, srv, net.JoinHostPort(testSNI, port))

	// Long enough for a backoff capped by ResolveInterval to reach seconds.
	rec.waitFor(t, "attempt=9")
	res.set("127.0.0.1")
	resolved := time.Now()
	mustServe(t, ts.member(t))
	if took := time.Since(resolved); took > time.Second {
		t.Errorf("registered %v after the name resolved, want within about MaxBackoff (100ms)", took)
	}
}

func TestFailedConnectionResolvesAgain(t *testing.T) {
	servers, addr := replicas(t)
	res := &testResolver{}
	res.set("127.0.0.1")
	srv, _ := replicaClient(servers[0], res)
	srv.ResolveInterval = time.Hour // only a failure can cause a new lookup
	serve(t, srv, addr)
	m1 := servers[0].member(t)
	before := res.lookups.Load()

	// The replica moves: its old address stops answering, the name
	// follows it.
	res.set("127.0.0.2")
	moved := time.Now()
	servers[0].stop()
	m2 := servers[1].member(t)
	took := time.Since(moved)
	t.Logf("registered on the new address %v after the move", took)
	if took > 3*time.Second {
		t.Errorf("moving took %v, want under 3s", took)
	}
	mustServe(t, m2)
	if n := res.lookups.Load(); n <= before {
		t.Errorf("lookups = %d, want more than %d", n, before)
	}
	if m1.conn.Context().Err() == nil {
		t.Error("old connection still open")
	}
}

func TestIPLiteralIsNotResolved(t *testing.T) {
	ts := newTunnelServer(t)
	res := &testResolver{}
	res.fail(errors.New("must not be called"))
	srv, _ := replicaClient(ts, res)
	serve(t, srv, ts.addr)
	mustServe(t, ts.member(t))
	if n := res.lookups.Load(); n != 0 {
		t.Errorf("lookups = %d for an IP address", n)
	}
}
