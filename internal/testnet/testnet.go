// Package testnet finds free loopback ports for tests that start servers
// in other processes, where a listener cannot be handed over. A port is
// only known to have been free a moment ago; the tests that use one start
// their server at once.
package testnet

import (
	"io"
	"net"
	"strconv"
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
	for range 50 {
		first, port, err := listen(protos[0], ips[0], 0)
		if err != nil {
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
