package tunnel

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
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
