package tunnel

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

// The registration limit keys an IPv6 client by its /64, which one host
// commonly holds whole, and an IPv4 client by its address however written.
func TestRegistrationLimiterKeys(t *testing.T) {
	l := newRegistrationLimiter(0.001, 1)
	allow := func(s string) bool { return l.allow(net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s))) }
	for _, c := range []struct {
		addr string
		want bool
	}{
		{"[2001:db8::1]:1000", true},
		{"[2001:db8::2]:2000", false}, // same /64
		{"[2001:db8:0:1::1]:1000", true},
		{"192.0.2.1:1000", true},
		{"[::ffff:192.0.2.1]:2000", false}, // the same IPv4 address
		{"192.0.2.2:1000", true},
	} {
		if got := allow(c.addr); got != c.want {
			t.Errorf("allow(%s) = %v, want %v", c.addr, got, c.want)
		}
	}
}

// The registration limit keeps no goroutine of its own: one would outlive
// the server, for good, once per server a process starts.
func TestRegistrationLimiterOutlivesNoServer(t *testing.T) {
	addr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort("192.0.2.1:1000"))
	const servers = 20
	before := runtime.NumGoroutine()
	for range servers {
		s := &Server{RegistrationRate: 1}
		s.allowAddr(addr)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Other tests' goroutines may still be ending: a few more than before
	// are theirs, one per server would be the limiters'.
	deadline := time.Now().Add(5 * time.Second)
	for n := runtime.NumGoroutine(); n > before+servers/4; n = runtime.NumGoroutine() {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after %d servers with a registration limit came and went, %d before", n, servers, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// An address silent for limiterIdle is forgotten, so that the table does
// not keep every address that ever registered; one that keeps coming
// keeps its state.
func TestRegistrationLimiterForgetsSilentAddresses(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newRegistrationLimiter(0.001, 1)
	l.now = func() time.Time { return now }
	allow := func(s string) bool { return l.allow(net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s))) }
	for i := range 100 {
		if !allow(fmt.Sprintf("192.0.2.%d:1000", i)) {
			t.Fatalf("first registration of address %d refused", i)
		}
	}
	now = now.Add(limiterIdle / 2)
	if allow("192.0.2.7:1000") {
		t.Fatal("a second registration within the limit's period went through")
	}
	now = now.Add(limiterIdle/2 + time.Second)
	if !allow("192.0.2.8:1000") {
		t.Fatal("an address silent for limiterIdle is still limited")
	}
	// 192.0.2.7 was seen half a period ago; the others are gone.
	if n := l.limiters.Len(); n != 2 {
		t.Fatalf("%d addresses in the table, want 2", n)
	}
	if allow("192.0.2.7:1000") {
		t.Fatal("an address that kept coming lost its state")
	}
}

// MaxPendingDataPerHost is exported to the tests of data connections.
const MaxPendingDataPerHost = maxPendingDataPerHost

// Data connections in their hello are bounded per host (IPv6 /64) and in
// all; a connection leaving its hello frees its place.
func TestPendingDataLimits(t *testing.T) {
	tcp := func(s string) net.Addr { return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(s)) }
	var p pendingData
	for i := range maxPendingDataPerHost {
		if !p.enter(tcp(fmt.Sprintf("[2001:db8::%x]:1000", i+1))) {
			t.Fatalf("connection %d of one /64 refused", i+1)
		}
	}
	if p.enter(tcp("[2001:db8::ffff]:1000")) {
		t.Fatal("one connection over the per-host limit let in")
	}
	if !p.enter(tcp("[2001:db8:0:1::1]:1000")) {
		t.Fatal("another /64 refused")
	}
	p.leave(tcp("[2001:db8::1]:1000"))
	if !p.enter(tcp("[2001:db8::ffff]:1000")) {
		t.Fatal("a place freed is not taken again")
	}

	p = pendingData{}
	for i := range maxPendingData {
		if !p.enter(tcp(fmt.Sprintf("10.%d.%d.1:1000", i/256, i%256))) {
			t.Fatalf("connection %d from its own host refused", i+1)
		}
	}
	if p.enter(tcp("192.0.2.1:1000")) {
		t.Fatal("one connection over the global limit let in")
	}
	p.leave(tcp("10.0.0.1:1000"))
	if !p.enter(tcp("192.0.2.1:1000")) {
		t.Fatal("a place freed in all is not taken again")
	}
	if len(p.byHost) != maxPendingData {
		t.Errorf("%d hosts counted, want %d: a host that left is still counted", len(p.byHost), maxPendingData)
	}
}
