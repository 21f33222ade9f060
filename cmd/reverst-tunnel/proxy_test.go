package main

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// echoBackend answers with what it received.
func echoBackend(t *testing.T) *httptest.Server {
	t.Helper()
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "host=%s uri=%s xff=%s xfh=%s xfp=%s", r.Host, r.RequestURI,
			r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Host"), r.Header.Get("X-Forwarded-Proto"))
	}))
	t.Cleanup(backend.Close)
	return backend
}

func TestProxyHostHeader(t *testing.T) {
	backend := echoBackend(t)
	target, err := url.Parse(backend.URL + "/base")
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	for _, tt := range []struct {
		mode, wantHost string
	}{
		{hostPreserve, "app.example"},
		{hostRewrite, target.Host},
		{"internal.example:8080", "internal.example:8080"},
	} {
		t.Run(tt.mode, func(t *testing.T) {
			front := httptest.NewServer(logRequests(newProxy(target, tt.mode, log), log))
			defer front.Close()
			req, _ := http.NewRequest(http.MethodGet, front.URL+"/x?q=1", nil)
			req.Host = "app.example"
			// As the tunnel server sets them for its visitor.
			req.Header.Set("X-Forwarded-For", "192.0.2.7")
			req.Header.Set("X-Forwarded-Host", "app.example")
			req.Header.Set("X-Forwarded-Proto", "https")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			want := "host=" + tt.wantHost + " uri=/base/x?q=1 xff=192.0.2.7 xfh=app.example xfp=https"
			if resp.StatusCode != http.StatusOK || string(body) != want {
				t.Errorf("got %d %q, want %q", resp.StatusCode, body, want)
			}
		})
	}
}

func TestProxyLocalServiceDown(t *testing.T) {
	backend := echoBackend(t)
	target, _ := url.Parse(backend.URL)
	backend.Close()
	front := httptest.NewServer(newProxy(target, hostPreserve, slog.New(slog.DiscardHandler)))
	defer front.Close()
	resp, err := http.Get(front.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "local service unavailable") {
		t.Errorf("got %d %q, want 502", resp.StatusCode, body)
	}
}

// The debug request log wraps the writer: flushed chunks must still reach
// the visitor at once.
func TestProxyStreamsThroughRequestLog(t *testing.T) {
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: first\n\n")
		http.NewResponseController(w).Flush()
		<-release
		fmt.Fprint(w, "data: second\n\n")
	}))
	defer backend.Close()
	defer close(release)
	target, _ := url.Parse(backend.URL)
	log := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug}))
	front := httptest.NewServer(logRequests(newProxy(target, hostPreserve, log), log))
	defer front.Close()

	resp, err := http.Get(front.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(resp.Body).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if s != "data: first\n" {
			t.Errorf("first line = %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the flushed chunk did not arrive before the response ended")
	}
}

// upgradeEcho is a backend that switches to an echo protocol on Upgrade,
// like a WebSocket server (without the framing).
func upgradeEcho(t *testing.T) *httptest.Server {
	t.Helper()
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { serveEcho(t, w, r) }))
	t.Cleanup(backend.Close)
	return backend
}

func serveEcho(t *testing.T, w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "echo" {
		http.Error(w, "upgrade required", http.StatusUpgradeRequired)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	defer conn.Close()
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
	_ = brw.Flush()
	_, _ = io.Copy(conn, brw)
}

// echoUpgrade upgrades a connection to addr (with Host host) and checks
// that bytes come back.
func echoUpgrade(t *testing.T, addr, host string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n", host)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("upgrade answered %d %q", resp.StatusCode, body)
	}
	for _, msg := range []string{"ping\n", "pong pong\n"} {
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		got, err := br.ReadString('\n')
		if err != nil || got != msg {
			t.Fatalf("echo = %q, %v; want %q", got, err, msg)
		}
	}
}

func TestProxyUpgrade(t *testing.T) {
	target, _ := url.Parse(upgradeEcho(t).URL)
	log := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug}))
	front := httptest.NewServer(logRequests(newProxy(target, hostPreserve, log), log))
	defer front.Close()
	echoUpgrade(t, front.Listener.Addr().String(), "app.example")
}
