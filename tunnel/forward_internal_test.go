package tunnel

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"
)

func TestRemoveHopByHop(t *testing.T) {
	h := http.Header{
		"Connection":         {"X-A, x-b", "Keep-Alive"},
		"X-A":                {"1"},
		"X-B":                {"2"},
		"Keep-Alive":         {"timeout=5"},
		"Transfer-Encoding":  {"chunked"},
		"Trailer":            {"X-T"},
		"Te":                 {"trailers"},
		"Upgrade":            {"h2c"},
		"Proxy-Connection":   {"keep-alive"},
		"Proxy-Authenticate": {"Basic"},
		"X-End":              {"3"},
		"Content-Type":       {"text/plain"},
	}
	removeHopByHop(h)
	want := http.Header{"X-End": {"3"}, "Content-Type": {"text/plain"}}
	if !reflect.DeepEqual(h, want) {
		t.Fatalf("got %v, want %v", h, want)
	}
}

func TestOutgoing(t *testing.T) {
	tests := []struct {
		name  string
		trust bool
		in    http.Header
		url   string
		want  http.Header
		query string
	}{{
		name: "plain",
		in:   http.Header{"Accept": {"*/*"}, "User-Agent": {"curl"}},
		url:  "/p?a=1&b=2",
		want: http.Header{
			"Accept": {"*/*"}, "User-Agent": {"curl"},
			"X-Forwarded-For": {"192.0.2.9"}, "X-Forwarded-Host": {"svc.example"}, "X-Forwarded-Proto": {"http"},
		},
		query: "a=1&b=2",
	}, {
		name: "hop-by-hop and forwarding headers dropped, no user agent added",
		in: http.Header{
			"Connection": {"X-Hop"}, "X-Hop": {"1"}, "Te": {"trailers, gzip"}, "Trailer": {"X-T"},
			"Proxy-Authorization": {"Basic Zm9v"}, "Forwarded": {"for=x"},
			"X-Forwarded-For": {"203.0.113.1"}, "X-Forwarded-Host": {"evil"}, "X-Forwarded-Proto": {"https"},
		},
		url: "/p?a=1;b=2",
		want: http.Header{
			"Te": {"trailers"}, "User-Agent": {""},
			"X-Forwarded-For": {"192.0.2.9"}, "X-Forwarded-Host": {"svc.example"}, "X-Forwarded-Proto": {"http"},
		},
		query: "",
	}, {
		name:  "trusted forwarding headers extended",
		trust: true,
		in: http.Header{
			"User-Agent":      {"ua"},
			"X-Forwarded-For": {"203.0.113.1", "198.51.100.2"}, "X-Forwarded-Host": {"front"}, "X-Forwarded-Proto": {"https"},
			"Forwarded": {"for=x"},
		},
		url: "/",
		want: http.Header{
			"User-Agent":      {"ua"},
			"X-Forwarded-For": {"203.0.113.1, 198.51.100.2, 192.0.2.9"}, "X-Forwarded-Host": {"front"}, "X-Forwarded-Proto": {"https"},
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, tt.url, nil)
			r.Host = "svc.example"
			r.RemoteAddr = "192.0.2.9:1234"
			r.Header = tt.in
			out := (&Server{TrustForwardedHeaders: tt.trust}).outgoing(r)
			if !reflect.DeepEqual(out.Header, tt.want) {
				t.Errorf("header\n got %v\nwant %v", out.Header, tt.want)
			}
			if out.URL.Scheme != "https" || out.URL.Host != "svc.example" || out.Host != "svc.example" || out.URL.RawQuery != tt.query {
				t.Errorf("target %s host %s", out.URL, out.Host)
			}
			if out.Body != nil {
				t.Errorf("a body-less request got a body")
			}
		})
	}
}

func TestCleanQuery(t *testing.T) {
	for in, want := range map[string]string{
		"a=1&b=2":     "a=1&b=2",
		"b=2&a=%41":   "b=2&a=%41", // left as sent when clean
		"a=1;b=2":     "",          // a member might split on ';'
		"a=%zz&b=2":   "b=2",
		"q=a b&z=1":   "q=a+b&z=1", // an HTTP/2 visitor's raw space
		"q=\x01":      "q=%01",
		"q=tab\there": "q=tab%09here",
	} {
		if got := cleanQuery(in); got != want {
			t.Errorf("cleanQuery(%q) = %q, want %q", in, got, want)
		}
	}
}
