package testnet_test

import (
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/reverst-dev/reverst/internal/testnet"
)

// A tunnel port can be bound for UDP and TCP alike right after.
func TestTunnelPortFreeForBoth(t *testing.T) {
	for range 20 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(testnet.Port(t, testnet.Tunnel)))
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", addr)
		u.Close()
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
}

// Ports come from below the ephemeral range, where no outgoing connection
// is given a local port, so that a server can stop and later find its
// port again.
func TestPortsBelowEphemeralRange(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Skip("the ephemeral range is not known here:", err)
	}
	lo, err := strconv.Atoi(strings.Fields(string(b))[0])
	if err != nil {
		t.Fatal(err)
	}
	if lo <= 11000 {
		t.Skipf("the ephemeral range starts at %d, leaving too few ports below it to draw from", lo)
	}
	for _, network := range []string{testnet.TCP, testnet.UDP, testnet.Tunnel} {
		for range 20 {
			if p := testnet.Port(t, network); p >= lo || p < 1024 {
				t.Fatalf("Port(%s) = %d, want in [1024, %d)", network, p, lo)
			}
		}
	}
}
