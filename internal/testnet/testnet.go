// Package testnet finds free loopback ports for tests that start servers
// in other processes, where a listener cannot be handed over. A port is
// only known to have been free a moment ago; the tests that use one start
// their server at once.
//
// Ports are taken below the kernel's ephemeral range when it is known, so
// that no outgoing connection can be given one as its local port while
// the server meant to hold it is down: a test that stops a server for a
// minute and starts it again on the same address would otherwise find the
// port taken by some other test's connection now and then.
package testnet

import (
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// Networks for Port and Addr.
const (
	TCP = "tcp"
	UDP = "udp"
	// Tunnel is free for both UDP and TCP, as a reverst tunnel address
	// takes QUIC and data connections on one port.
	Tunnel = "tunnel"
)

// Port returns a port free on network at every one of ips, 127.0.0.1
// when none is given.
func Port(t testing.TB, network string, ips ...string) int {
	t.Helper()
	if len(ips) == 0 {
		ips = []string{"127.0.0.1"}
	}
	protos := []string{network}
	if network == Tunnel {
		protos = []string{UDP, TCP}
	}
	below := ephemeralStart()
	for range 50 {
		try := 0 // the kernel's choice, in the ephemeral range
		if below > firstPort {
			try = firstPort + rand.IntN(below-firstPort)
		}
		first, port, err := listen(protos[0], ips[0], try)
		if err != nil {
			if try != 0 {
				continue // taken: draw again
			}
			t.Fatal(err)
		}
		held := []io.Closer{first}
		ok := true
		for _, ip := range ips {
			for _, proto := range protos {
				if ip == ips[0] && proto == protos[0] {
					continue
				}
				c, _, err := listen(proto, ip, port)
				if err != nil {
					ok = false
					break
				}
				held = append(held, c)
			}
		}
		for _, c := range held {
			_ = c.Close()
		}
		if ok {
			return port
		}
	}
	t.Fatalf("no port free on %s at %v", network, ips)
	return 0
}

// Addr returns 127.0.0.1 and a port free on network.
func Addr(t testing.TB, network string) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(Port(t, network)))
}

func listen(proto, ip string, port int) (io.Closer, int, error) {
	addr := net.JoinHostPort(ip, strconv.Itoa(port))
	if proto == UDP {
		c, err := net.ListenPacket(proto, addr)
		if err != nil {
			return nil, 0, err
		}
		return c, c.LocalAddr().(*net.UDPAddr).Port, nil
	}
	l, err := net.Listen(proto, addr)
	if err != nil {
		return nil, 0, err
	}
	return l, l.Addr().(*net.TCPAddr).Port, nil
}

// firstPort is the lowest port handed out: below it live well-known
// services, and ports under 1024 need privileges.
const firstPort = 10000

// ephemeralStart returns the first port of the range Linux gives outgoing
// connections, or 0 when it is not known (then the kernel picks ports).
func ephemeralStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil || lo <= firstPort+1000 {
		return 0 // too few ports below it to draw from
	}
	return lo
}
