package client_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/protocol"
)

// hostileServer registers clients over QUIC, offering data connections,
// and hands every accepted data connection (after the hello and DataOK)
// to onData.
type hostileServer struct {
	addr    string
	tcp     net.Listener
	members chan *member
	dials   atomic.Int64 // data connections that completed the hello
	onData  func(c *tls.Conn)
}

func newHostileServer(t *testing.T, onData func(c *tls.Conn)) *hostileServer {
	t.Helper()
	pki := newPKI(t)
	addr := testnet.Addr(t, testnet.Tunnel)
	hs := &hostileServer{addr: addr, members: make(chan *member, 16), onData: onData}
	ln, err := quic.ListenAddr(addr, &tls.Config{Certificates: []tls.Certificate{pki.Cert}, NextProtos: []string{protocol.ALPN}}, &quic.Config{KeepAlivePeriod: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := tls.Listen("tcp", addr, &tls.Config{Certificates: []tls.Certificate{pki.Cert}, NextProtos: []string{protocol.DataALPN}})
	if err != nil {
		t.Fatal(err)
	}
	hs.tcp = tcp
	t.Cleanup(func() { _ = ln.Close(); _ = tcp.Close() })
	go func() {
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				st, err := conn.AcceptStream(context.Background())
				if err != nil {
					return
				}
				req, err := protocol.ReadRequest(st)
				if err != nil {
					return
				}
				md := map[string]string{}
				if req.Metadata[protocol.MetadataData] != "" {
					md[protocol.MetadataData] = strings.Repeat("A", protocol.DataTokenSize)
				}
				_ = protocol.WriteResponse(st, &protocol.RegisterResponse{Version: 1, Metadata: md})
				hs.members <- &member{conn: conn, cc: (&http3.Transport{}).NewClientConn(conn), req: req}
			}()
		}
	}()
	go func() {
		for {
			c, err := tcp.Accept()
			if err != nil {
				return
			}
			go func() {
				tc := c.(*tls.Conn)
				if _, err := protocol.ReadDataHello(tc); err != nil {
					_ = c.Close()
					return
				}
				if _, err := tc.Write([]byte{protocol.DataOK}); err != nil {
					return
				}
				hs.dials.Add(1)
				hs.onData(tc)
			}()
		}
	}()
	return hs
}

// serveHostile serves h through hs, as a client that trusts any
// certificate (as with --insecure; the threat is the server anyway), until
// the test ends, and waits for its registration.
func serveHostile(t *testing.T, hs *hostileServer, h http.Handler) {
	t.Helper()
	serve(t, &client.Server{
		TunnelGroup: testGroup,
		Handler:     h,
		TLSConfig:   &tls.Config{InsecureSkipVerify: true},
		Logger:      slog.New(slog.DiscardHandler),
	}, hs.addr)
	select {
	case <-hs.members:
	case <-time.After(waitTimeout):
		t.Fatal("no registration")
	}
}

// A server that accepts every data connection (hello answered with
// DataOK) and closes it at once must not make the client redial in a
// tight loop: each round is a TCP connect and a TLS handshake.
func TestHostileDataConnClosedAfterHello(t *testing.T) {
	hs := newHostileServer(t, func(c *tls.Conn) { _ = c.Close() })
	serveHostile(t, hs, testHandler())
	time.Sleep(2 * time.Second)
	n := hs.dials.Load()
	t.Logf("data connections dialled in ~2s: %d", n)
	if n > 50 {
		t.Fatalf("client dialled %d data connections in 2s against a server that closes each one at once: no backoff", n)
	}
}

// newUpgradingServer is a hostile server that sends an Upgrade request on
// every data connection and keeps those the client upgrades open; open
// counts them.
func newUpgradingServer(t *testing.T) (hs *hostileServer, open *atomic.Int64) {
	open = new(atomic.Int64)
	hs = newHostileServer(t, func(c *tls.Conn) {
		_, _ = io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		br := bufio.NewReader(c)
		line, _ := br.ReadString('\n')
		if !strings.Contains(line, "101") {
			_ = c.Close()
			return
		}
		open.Add(1)
		defer open.Add(-1)
		_, _ = io.Copy(io.Discard, br)
	})
	return hs, open
}

// A server that sends an Upgrade request on every data connection, where
// upgrades have no place, gets 400; a connection a handler hijacks anyway
// still counts against dataMax (128) until closed, or the client would
// dial without bound.
func TestHostileUpgradeOnDataConnUnbounded(t *testing.T) {
	hs, open := newUpgradingServer(t)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			return
		}
		// What a WebSocket library (or ReverseProxy after a 101) does.
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		_ = brw.Flush()
		go func() { _, _ = io.Copy(io.Discard, conn); _ = conn.Close() }()
	})
	serveHostile(t, hs, h)
	time.Sleep(3 * time.Second)
	t.Logf("data connections dialled: %d, upgraded and still open: %d", hs.dials.Load(), open.Load())
	if n := open.Load(); n > 128 {
		t.Fatalf("%d upgraded data connections open at once, beyond the client's dataMax of 128", n)
	}
}

// A server that registers the client and closes the connection at once,
// with odd codes and reasons, must see a backed-off reconnect, never a
// tight loop, and DialAndServe must go on.
func TestHostileAcceptThenClose(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	errc, _ := serve(t, srv, ts.addr)
	go func() {
		i := 0
		for m := range ts.members {
			codes := []quic.ApplicationErrorCode{0x2, 0x1, 0x0, 0xffff, 0x2}
			reasons := []string{"Unauthorized", "", "x", strings.Repeat("z", 1000), "unauthorized "}
			_ = m.conn.CloseWithError(codes[i%5], reasons[i%5])
			i++
		}
	}()
	time.Sleep(4 * time.Second)
	select {
	case err := <-errc:
		t.Fatalf("DialAndServe ended: %v", err)
	default:
	}
	n := ts.attempts.Load()
	t.Logf("attempts in 4s: %d", n)
	if n > 15 {
		t.Fatalf("%d registrations in 4s", n)
	}
}

// The same through reverst-tunnel's handler: httputil.ReverseProxy to a
// local service that accepts upgrades (any WebSocket service). Every data
// connection the server upgrades also holds a connection to the local
// service, and they outlive the tunnel connection they came with.
func TestHostileUpgradeOnDataConnReverseProxy(t *testing.T) {
	hs, open := newUpgradingServer(t)
	var localConns atomic.Int64
	local, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = local.Close() })
	go func() {
		for {
			c, err := local.Accept()
			if err != nil {
				return
			}
			localConns.Add(1)
			go func() {
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil || line == "\r\n" {
						break
					}
				}
				_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	target, _ := url.Parse("http://" + local.Addr().String())
	proxy := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(target); pr.Out.Host = pr.In.Host }}
	serveHostile(t, hs, proxy)
	time.Sleep(3 * time.Second)
	t.Logf("data connections: %d, upgraded and open: %d, connections to the local service: %d", hs.dials.Load(), open.Load(), localConns.Load())
	if localConns.Load() > 128 {
		t.Fatalf("unbounded: %d connections to the local service, each with an upgraded data connection", localConns.Load())
	}
}

// Thousands of concurrent requests: the client's handlers in flight stay
// bounded by QUIC's stream limit.
func TestHostileManyStreams(t *testing.T) {
	ts := newTunnelServer(t)
	srv, _ := newClient(ts)
	var cur, peak atomic.Int64
	release := make(chan struct{})
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-release
		cur.Add(-1)
	})
	serve(t, srv, ts.addr)
	m := ts.member(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for i := 0; i < 2000; i++ {
		go func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+testHost+"/", nil)
			if resp, err := m.cc.RoundTrip(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	time.Sleep(2 * time.Second)
	t.Logf("peak handlers in flight: %d", peak.Load())
	close(release)
	if peak.Load() > 100 {
		t.Fatalf("peak %d", peak.Load())
	}
}
