package tunnel_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/websocket"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

func TestWebSocketEcho(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "ws", Hosts: []string{"127.0.0.1"}})
	closed := make(chan string, 1)
	ready := make(chan struct{}, 1)
	srv := &client.Server{
		TunnelGroup: "ws",
		TLSConfig:   e.clientTLS(),
		Logger:      slog.New(slog.DiscardHandler),
		Handler: websocket.Handler(func(ws *websocket.Conn) {
			r := ws.Request()
			if _, err := fmt.Fprintf(ws, "hello %s xff=%s", r.Host, r.Header.Get("X-Forwarded-For")); err != nil {
				closed <- err.Error()
				return
			}
			for {
				var msg string
				if err := websocket.Message.Receive(ws, &msg); err != nil {
					closed <- fmt.Sprint("receive ended: ", err)
					return
				}
				if err := websocket.Message.Send(ws, msg); err != nil {
					closed <- err.Error()
					return
				}
			}
		}),
		OnConnectionReady: func(client.ConnectionInfo) { ready <- struct{}{} },
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.DialAndServe(ctx, e.addr) }()
	<-ready

	url := strings.Replace(e.frontend, "http://", "ws://", 1) + "/echo"
	ws, err := websocket.Dial(url, "", e.frontend)
	if err != nil {
		t.Fatal(err)
	}
	var greeting string
	if err := websocket.Message.Receive(ws, &greeting); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(greeting, "hello 127.0.0.1:") || !strings.Contains(greeting, "xff=127.0.0.1") {
		t.Fatalf("greeting %q", greeting)
	}
	for i := range 20 {
		msg := fmt.Sprintf("message %d %s", i, strings.Repeat("x", i*1000))
		if err := websocket.Message.Send(ws, msg); err != nil {
			t.Fatal(err)
		}
		var got string
		if err := websocket.Message.Receive(ws, &got); err != nil {
			t.Fatal(err)
		}
		if got != msg {
			t.Fatalf("echo %d: got %d bytes, want %d", i, len(got), len(msg))
		}
	}
	// Closing on the visitor's side reaches the member's handler.
	ws.Close()
	select {
	case how := <-closed:
		t.Log(how)
	case <-time.After(5 * time.Second):
		t.Fatal("member handler did not see the close")
	}
}

// An older tunnel client serves plain HTTP/3 without the upgrade
// extension: its plain requests work, and an upgrade is a clean 502.
func TestUpgradeToOlderClient(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "old", Hosts: []string{"127.0.0.1"}})
	conn, str := e.rawStream(t)
	if err := protocol.WriteRequest(str, &protocol.RegisterRequest{Version: 1, TunnelGroup: "old"}); err != nil {
		t.Fatal(err)
	}
	if _, err := protocol.ReadResponse(str); err != nil {
		t.Fatal(err)
	}
	h3 := &http3.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect {
			http.Error(w, "no", http.StatusMethodNotAllowed)
			return
		}
		fmt.Fprint(w, "old client ok")
	})}
	go func() { _ = h3.ServeQUICConn(conn) }()
	e.waitMembers(t, "old", func(n int) bool { return n == 1 })

	if code, body := e.get(t, "127.0.0.1", "/"); code != 200 || body != "old client ok" {
		t.Fatalf("plain request: %d %q", code, body)
	}
	url := strings.Replace(e.frontend, "http://", "ws://", 1) + "/"
	_, err := websocket.Dial(url, "", e.frontend)
	if err == nil || !strings.Contains(err.Error(), "bad status") {
		t.Fatalf("websocket to an older client: %v, want a bad status", err)
	}
	if code, _ := e.get(t, "127.0.0.1", "/"); code != 200 {
		t.Fatalf("after the refused upgrade: %d", code)
	}
}

// A member that refuses an upgrade does not get the visitor's connection:
// the next request on it, for another host, must not reach that member.
func TestRefusedUpgradeEndsConnection(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "a", Hosts: []string{"a.example"}}, tunnel.Group{Name: "b", Hosts: []string{"b.example"}})
	e.serve(t, "a", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no websocket here", http.StatusBadRequest)
	}))
	e.serve(t, "b", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "member of b") }))
	c := e.dialFrontend(t)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: b.example\r\n\r\n")
	if resp, err = http.ReadResponse(br, nil); err != nil {
		return // the connection was closed: fine
	}
	if body, _ := io.ReadAll(resp.Body); string(body) != "member of b" {
		t.Fatalf("request for b.example answered %d %q", resp.StatusCode, body)
	}
}

// upgradeHeaders starts a server whose member refuses upgrades, and
// returns a function that sends it the raw upgrade request head (up to the
// last header line's CRLF) and returns the header the member got.
func upgradeHeaders(t *testing.T) func(head string) http.Header {
	e := startServer(t, svc)
	seen := make(chan http.Header, 1)
	e.serve(t, "svc", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		w.WriteHeader(http.StatusForbidden)
	}))
	return func(head string) http.Header {
		t.Helper()
		c := e.dialFrontend(t)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, head+"\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return <-seen
	}
}

// The visitor's hop-by-hop headers stop at the server on an upgrade too;
// the upgrade's own Connection and Upgrade reach the member.
func TestUpgradeDropsHopByHopHeaders(t *testing.T) {
	h := upgradeHeaders(t)("GET /ws HTTP/1.1\r\nHost: svc.example\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\n" +
		"X-Hop: 1\r\nProxy-Authorization: Basic dmlzaXRvcjpzZWNyZXQ=\r\nKeep-Alive: timeout=5\r\nX-End: 1\r\n")
	for _, k := range []string{"X-Hop", "Proxy-Authorization", "Keep-Alive"} {
		if v, ok := h[k]; ok {
			t.Errorf("member got %s: %q", k, v)
		}
	}
	if h.Get("Upgrade") != "websocket" || h.Get("Connection") != "Upgrade" || h.Get("X-End") != "1" {
		t.Errorf("member got Upgrade %q, Connection %q, X-End %q; want websocket, Upgrade, 1", h.Get("Upgrade"), h.Get("Connection"), h.Get("X-End"))
	}
}

// The Connection header a visitor sends with its upgrade, whatever else
// it lists, reaches the member as the one value Upgrade, and every
// Upgrade value as sent: "close" among them must not come back as a
// Connection header of its own, first of two.
func TestUpgradeConnectionHeaderVariants(t *testing.T) {
	send := upgradeHeaders(t)
	for _, conn := range []string{"keep-alive, Upgrade", "close, Upgrade", "Upgrade\r\nConnection: close"} {
		h := send("GET /ws HTTP/1.1\r\nHost: svc.example\r\nConnection: " + conn + "\r\nUpgrade: websocket\r\nUpgrade: other/1\r\n")
		if got := h.Values("Connection"); len(got) != 1 || got[0] != "Upgrade" {
			t.Errorf("Connection: %q: member got Connection %q, want [Upgrade]", conn, got)
		}
		if got := h.Values("Upgrade"); len(got) != 2 || got[0] != "websocket" || got[1] != "other/1" {
			t.Errorf("Connection: %q: member got Upgrade %q", conn, got)
		}
	}
}

// An upgrade to a group whose members are all busy gets the busy answer,
// with its Retry-After, like any request.
func TestUpgradeToBusyGroup(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) { s.MaxRequestsPerMember = 1; s.QueueTimeout = 200 * time.Millisecond }, svc)
	e.fillMember(t)
	req, err := http.NewRequest(http.MethodGet, e.frontend+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "svc.example"
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("upgrade to a busy group: %d, Retry-After %q; want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}

// An upgrade that lands on a member whose connection is dead, not yet
// dropped, goes to another member: the visitor's request had not reached
// the dead one.
func TestUpgradeToDeadMember(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "ws", Hosts: []string{"127.0.0.1"}})
	e.serve(t, "ws", websocket.Handler(func(ws *websocket.Conn) { _, _ = io.Copy(ws, ws) }))
	_, udp, _ := e.registerRaw(t, "ws", map[string]string{protocol.MetadataKeepAlive: "100ms"},
		&quic.Config{KeepAlivePeriod: 100 * time.Millisecond, MaxIdleTimeout: 10 * time.Second})
	e.waitMembers(t, "ws", func(n int) bool { return n == 2 })
	udp.Close() // dead, and still a member for about 400 ms
	url := strings.Replace(e.frontend, "http://", "ws://", 1) + "/"
	// Idle members take turns: one of the two lands on the dead one.
	for i := range 2 {
		ws, err := websocket.Dial(url, "", e.frontend)
		if err != nil {
			t.Fatalf("upgrade %d: %v", i, err)
		}
		if _, err := io.WriteString(ws, "ping"); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(ws, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo %d: %q %v", i, buf, err)
		}
		ws.Close()
	}
}

// A visitor that leaves before the member answers its upgrade cancels the
// member's handler, though none of its bytes may reach the member then.
func TestVisitorLeavesBeforeUpgradeAnswer(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "ws", Hosts: []string{"127.0.0.1"}})
	cancelled := make(chan struct{})
	e.serve(t, "ws", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			close(cancelled)
		case <-time.After(10 * time.Second):
		}
	}))
	c := e.dialFrontend(t)
	io.WriteString(c, "GET /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	time.Sleep(300 * time.Millisecond)
	c.Close()
	select {
	case <-cancelled:
	case <-time.After(3 * time.Second):
		t.Fatal("the member's handler ran on after the visitor left")
	}
}

// Upgrades work from a TLS frontend too, whose hijacked connection is a
// tls.Conn.
func TestWebSocketThroughTLSFrontend(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "ws", Hosts: []string{"127.0.0.1"}})
	e.serve(t, "ws", websocket.Handler(func(ws *websocket.Conn) { _, _ = io.Copy(ws, ws) }))
	front := httptest.NewTLSServer(e.srv)
	defer front.Close()
	conf, err := websocket.NewConfig(strings.Replace(front.URL, "https://", "wss://", 1)+"/", front.URL)
	if err != nil {
		t.Fatal(err)
	}
	conf.TlsConfig = front.Client().Transport.(*http.Transport).TLSClientConfig
	ws, err := websocket.DialConfig(conf)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	for _, msg := range []string{"one", "two"} {
		if _, err := io.WriteString(ws, msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(ws, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo: %q %v", buf, err)
		}
	}
}

// An upgrade request with a body is proxied as a plain request; hijacking
// the visitor's connection then would race net/http's own read of it.
func TestUpgradeWithBody(t *testing.T) {
	e := startServer(t, tunnel.Group{Name: "ws", Hosts: []string{"127.0.0.1"}})
	e.serve(t, "ws", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		time.Sleep(200 * time.Millisecond)
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, "got "+string(b))
	}))
	c := e.dialFrontend(t)
	io.WriteString(c, "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusForbidden || string(b) != "got hello" {
		t.Fatalf("upgrade with a body: %d %q", res.StatusCode, b)
	}
}
