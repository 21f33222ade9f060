package testnet_test

import (
	"net"
	"strconv"
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
