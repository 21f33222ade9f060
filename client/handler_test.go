package client_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/client"
)

// Response trailers set the way net/http documents (declared, then set
// after the body, with no flush) reach the visitor on either transport:
// net/http never gives such a response a Content-Length, and neither may
// the tunnel, or the tunnel server stops reading at the body's end and
// the trailers are lost.
func TestResponseTrailersWithoutFlush(t *testing.T) {
	transports(t, func(t *testing.T, quicOnly bool) {
		e := startRealServer(t)
		srv := &client.Server{QUICOnly: quicOnly, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			// As in net/http's ResponseWriter example.
			w.Header().Set("Trailer", "AtEnd1")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, "body")
			w.Header().Set("AtEnd1", "value 1")
			w.Header().Set(http.TrailerPrefix+"AtEnd2", "value 2")
		})}
		e.join(t, srv)
		resp, err := http.DefaultClient.Do(e.request(t, t.Context(), http.MethodGet, "/"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "body" {
			t.Fatalf("body %q, %v", b, err)
		}
		if got := resp.Trailer.Get("AtEnd1"); got != "value 1" {
			t.Errorf("trailer AtEnd1 = %q, want %q (trailers %v, Content-Length %d)", got, "value 1", resp.Trailer, resp.ContentLength)
		}
		if got := resp.Trailer.Get("AtEnd2"); got != "value 2" {
			t.Errorf("trailer AtEnd2 = %q, want %q (trailers %v)", got, "value 2", resp.Trailer)
		}
	})
}

// A handler sees the same r.TLS, the tunnel's, whichever way a request
// came: middleware that tells secure requests by r.TLS (HSTS, Secure
// cookies, a redirect to https) must not treat a WebSocket upgrade
// differently from the page that opened it.
func TestRequestTLSOnEveryTransport(t *testing.T) {
	e := startRealServer(t)
	seen := make(chan *tls.ConnectionState, 1)
	srv := &client.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.TLS
		if r.Header.Get("Upgrade") != "" {
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Upgrade", "test")
			w.WriteHeader(http.StatusSwitchingProtocols)
		}
	})}
	e.join(t, srv)
	check := func(what string) {
		t.Helper()
		select {
		case cs := <-seen:
			if cs == nil || !cs.HandshakeComplete || cs.ServerName != "localhost" {
				t.Errorf("%s: r.TLS = %+v, want the tunnel's TLS state", what, cs)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("%s: the handler was not called", what)
		}
	}

	resp, err := http.DefaultClient.Do(e.request(t, t.Context(), http.MethodGet, "/"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	check("plain request")

	u, err := url.Parse(e.frontend)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n", realHost)
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	check("upgrade")
}
