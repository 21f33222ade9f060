package tunnel

import (
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
