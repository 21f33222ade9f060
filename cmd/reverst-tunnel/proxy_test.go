package main

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
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
