package tunnel

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http/httpguts"

	"github.com/reverst-dev/reverst/groups"
)

// Frontend answers for requests that cannot be proxied.
const (
	bodyUnknownHost = "reverst: no tunnel group serves this host\n"
	bodyNoMember    = "reverst: no tunnel is connected for this host; try again later\n"
	bodyBadGateway  = "reverst: the tunnel failed to answer\n"
	bodyBusy        = "reverst: every tunnel for this host is busy; try again later\n"
)

var errNoMember = errors.New("no member available")

func (s *Server) transport() *http3.Transport {
	s.proxyOnce.Do(s.initProxy)
	return s.h3
}

func (s *Server) initProxy() {
	s.h3 = &http3.Transport{
		// The visitor's Accept-Encoding goes through untouched; the proxy
		// must never decompress on its behalf.
		DisableCompression:     true,
		MaxResponseHeaderBytes: s.maxResponseHeaderBytes(),
	}
	s.buffers = &bufferPool{size: 32 << 10}
	s.bulkBuffers = &bufferPool{size: bulkSize}
}

func (s *Server) maxResponseHeaderBytes() int {
	if s.MaxResponseHeaderBytes > 0 {
		return s.MaxResponseHeaderBytes
	}
	return DefaultMaxResponseHeaderBytes
}

// ServeHTTP is the HTTP frontend: it routes r by host to a group and
// proxies it to one of the group's members. An unknown host is answered
// 502, a group without members 503, each with a short text body.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var g *group
	status := 0
	defer func() {
		// Deferred, so that a response cut short (a panic with
		// http.ErrAbortHandler) is counted too.
		d := time.Since(start)
		s.Metrics.request(g, status, d)
		s.logRequest(r, label(g), status, d)
	}()
	if !httpguts.ValidHeaderFieldName(r.Method) {
		// Go's HTTP/2 server takes any :method, spaces included, where
		// its HTTP/1 server takes only a token: on a data connection's
		// request line such a method would shift the fields the member
		// reads ("GET /admin /x HTTP/1.1"). A field name is a token.
		status = http.StatusBadRequest
		textError(w, "reverst: invalid method\n", status)
		return
	}
	host := s.routingHost(r)
	if !httpguts.ValidHostHeader(r.Host) || host != r.Host && !httpguts.ValidHostHeader(host) {
		// An absolute-form target is not checked by net/http as a Host
		// header is, nor is X-Forwarded-Host. NormalizeHost would map a
		// non-ASCII one onto a configured host ("ｓvc.example" to
		// "svc.example") that the member does not see.
		status = http.StatusBadRequest
		textError(w, "reverst: invalid host\n", status)
		return
	}
	g = s.table.Load().lookupHost(groups.NormalizeHost(host))
	if g == nil {
		status = http.StatusBadGateway
		textError(w, bodyUnknownHost, status)
		return
	}
	if isUpgrade(r) {
		status = s.serveUpgrade(w, r, g)
		return
	}
	var abort bool
	status, abort = s.forward(w, r, g)
	if abort {
		panic(http.ErrAbortHandler)
	}
}

// logRequest writes a request's access line, at debug level. The query
// string is left out: it may carry a visitor's secret (an access token).
func (s *Server) logRequest(r *http.Request, group string, status int, d time.Duration) {
	log := s.logger()
	if !log.Enabled(r.Context(), slog.LevelDebug) {
		return
	}
	log.LogAttrs(r.Context(), slog.LevelDebug, "request",
		slog.String("group", group),
		slog.String("method", r.Method),
		slog.String("host", r.Host),
		slog.String("path", r.URL.Path),
		slog.Int("status", status),
		slog.Duration("duration", d),
		slog.String("remote", r.RemoteAddr),
		slog.String("proto", r.Proto))
}

// routingHost is the host a request is routed by.
func (s *Server) routingHost(r *http.Request) string {
	if s.TrustForwardedHeaders {
		if v := r.Header.Get("X-Forwarded-Host"); v != "" {
			// A chain of proxies appends; the first is the visitor's.
			first, _, _ := strings.Cut(v, ",")
			return strings.TrimSpace(first)
		}
	}
	return r.Host
}

// proxyError answers a request that could not be proxied and returns its
// status.
func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, g *group, err error) int {
	if errors.Is(err, errNoMember) {
		textError(w, bodyNoMember, http.StatusServiceUnavailable)
		return http.StatusServiceUnavailable
	}
	if errors.Is(err, errBusy) {
		w.Header().Set("Retry-After", "1")
		textError(w, bodyBusy, http.StatusServiceUnavailable)
		return http.StatusServiceUnavailable
	}
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		// The visitor went away; nobody reads the answer.
		w.WriteHeader(statusClientClosed)
		return statusClientClosed
	}
	s.logger().Warn("proxy error", "group", g.name, "error", err)
	textError(w, bodyBadGateway, http.StatusBadGateway)
	return http.StatusBadGateway
}

// statusClientClosed is the status, after nginx, of a request whose
// visitor went away before its answer.
const statusClientClosed = 499

func textError(w http.ResponseWriter, body string, code int) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, body)
}

// bufferPool recycles the response copy buffers: without it, a 32 KiB
// buffer is most of the garbage a small response makes.
type bufferPool struct {
	size int
	pool sync.Pool
}

// bulkSize is the copy buffer of large responses. Each read from a member
// may send it flow-control credit and each write to the visitor is a
// system call, so a large buffer saves both.
const bulkSize = 256 << 10

func (b *bufferPool) get() *[]byte {
	if buf, ok := b.pool.Get().(*[]byte); ok {
		return buf
	}
	buf := make([]byte, b.size)
	return &buf
}

func (b *bufferPool) put(buf *[]byte) { b.pool.Put(buf) }
