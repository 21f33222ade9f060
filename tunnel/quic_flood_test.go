package tunnel_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// capturePC is a net.PacketConn that records what quic-go writes and never
// delivers anything: a client whose first flight we keep and replay.
type capturePC struct {
	net.PacketConn
	mu   sync.Mutex
	pkts [][]byte
	done chan struct{}
	once sync.Once
}

func (c *capturePC) WriteTo(b []byte, a net.Addr) (int, error) {
	c.mu.Lock()
	c.pkts = append(c.pkts, bytes.Clone(b))
	c.mu.Unlock()
	return len(b), nil
}
func (c *capturePC) ReadFrom([]byte) (int, net.Addr, error) { <-c.done; return 0, nil, net.ErrClosed }
func (c *capturePC) Close() error                           { c.once.Do(func() { close(c.done) }); return nil }

// clientFirstFlight returns the datagrams of a fresh client's first flight
// (its Initial packets, with a ClientHello): what an attacker replays,
// with a new connection ID each, from any source address.
func clientFirstFlight(t testing.TB, addr string, tlsConf *tls.Config) [][]byte {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	pc := &capturePC{PacketConn: udp, done: make(chan struct{})}
	tr := &quic.Transport{Conn: pc}
	raddr, _ := net.ResolveUDPAddr("udp", addr)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	_, _ = tr.Dial(ctx, raddr, tlsConf, &quic.Config{})
	cancel()
	pc.Close()
	tr.Close()
	pc.mu.Lock()
	defer pc.mu.Unlock()
	// Keep the first datagram(s) before any retransmission: the Initial
	// carrying the whole ClientHello (X25519 only keeps it in one).
	return pc.pkts[:1]
}

func countGoroutines(substr string) int {
	var b strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
	return strings.Count(b.String(), substr)
}

// A flood of Initial packets (one 1200-byte datagram each, from a source
// address that may be spoofed) costs the server a stateless Retry each,
// not a TLS handshake and a connection held for its handshake timeout.
func TestInitialFloodAnsweredWithRetry(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.RegistrationRate = 1
		s.RegistrationBurst = 1
	}, svc)
	tlsConf := e.clientTLS()
	tlsConf.CurvePreferences = []tls.CurveID{tls.X25519}

	const n = 200
	flights := make([][][]byte, n)
	for i := range flights {
		flights[i] = clientFirstFlight(t, e.addr, tlsConf)
	}
	sent := 0
	for _, f := range flights {
		for _, p := range f {
			sent += len(p)
		}
	}

	atk, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer atk.Close()
	raddr, _ := net.ResolveUDPAddr("udp", e.addr)
	var (
		recvMu    sync.Mutex
		recvBytes int
		retries   int
	)
	go func() {
		buf := make([]byte, 2048)
		for {
			k, _, err := atk.ReadFrom(buf)
			if err != nil {
				return
			}
			recvMu.Lock()
			recvBytes += k
			// Long header, type Retry (0b11 in bits 4-5).
			if buf[0]&0x80 != 0 && (buf[0]&0x30)>>4 == 3 {
				retries++
			}
			recvMu.Unlock()
		}
	}()

	runtime.GC()
	goBefore := runtime.NumGoroutine()
	heapBefore := heapInUse()
	start := time.Now()
	for _, f := range flights {
		for _, p := range f {
			if _, err := atk.WriteTo(p, raddr); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(200 * time.Microsecond) // let loopback keep up
	}
	time.Sleep(300 * time.Millisecond)
	pending := countGoroutines("handleNewConn")
	goGrown := runtime.NumGoroutine() - goBefore
	heapGrown := int64(heapInUse()) - int64(heapBefore)
	t.Logf("%d Initials (%d bytes) in %s: %d server handshakes pending, +%d goroutines, heap +%d KiB (%d B each)",
		n, sent, time.Since(start).Round(time.Millisecond), pending, goGrown, heapGrown>>10, heapGrown/int64(n))

	// How long are they held?
	held := time.Now()
	for countGoroutines("handleNewConn") > 0 && time.Since(held) < 15*time.Second {
		time.Sleep(100 * time.Millisecond)
	}
	recvMu.Lock()
	t.Logf("pending handshakes gone after %s; server sent %d bytes back (%.1fx), %d Retry packets",
		time.Since(held).Round(100*time.Millisecond), recvBytes, float64(recvBytes)/float64(sent), retries)
	recvMu.Unlock()

	if retries == 0 && pending > n/5 {
		t.Fatalf("one source address made the server keep %d unvalidated handshakes (%d goroutines, %d KiB) for ~5 s, with no Retry and a registration limit of 1/s",
			pending, goGrown, heapGrown>>10)
	}
}

// The per-address registration limit applies before the TLS handshake
// to an address the Retry has validated: a client over its limit costs
// the server a CONNECTION_REFUSED, not a handshake.
func TestRateLimitBeforeHandshake(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) {
		s.RegistrationRate = 1
		s.RegistrationBurst = 1
	}, svc)
	const n = 50
	var handshakes int
	start := time.Now()
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := quic.DialAddr(ctx, e.addr, e.clientTLS(), &quic.Config{})
		cancel()
		if err != nil {
			continue
		}
		handshakes++
		str, err := conn.OpenStreamSync(context.Background())
		if err == nil {
			_ = protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: "nope"})
		}
		_ = conn.CloseWithError(0, "")
	}
	t.Logf("%d of %d full TLS handshakes completed in %s from one IP limited to 1 registration/s", handshakes, n, time.Since(start).Round(time.Millisecond))
	if handshakes > 5 {
		t.Fatalf("registration limit 1/s, burst 1: the server still completed %d handshakes from one address", handshakes)
	}
}
