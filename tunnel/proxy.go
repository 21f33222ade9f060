package tunnel

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go/http3"

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
		MaxResponseHeaderBytes: s.MaxResponseHeaderBytes,
	}
	s.buffers = &bufferPool{}
	s.errorLog = slog.NewLogLogger(s.logger().Handler(), slog.LevelWarn)
}

// newProxy returns the reverse proxy of g. Each group has its own, bound to
// it, so that a request needs no copy to carry its group to RoundTrip.
func (s *Server) newProxy(g *group) *httputil.ReverseProxy {
	s.proxyOnce.Do(s.initProxy)
	rt := &groupTransport{s: s, g: g}
	return &httputil.ReverseProxy{
		Rewrite:   s.rewrite,
		Transport: rt,
		// Stream as the member writes: server-sent events and chunked
		// responses must not wait for a buffer to fill.
		FlushInterval: -1,
		// Without a pool the proxy allocates 32 KiB per request, most of
		// the garbage a small response makes.
		BufferPool:   s.buffers,
		ErrorHandler: rt.error,
		ErrorLog:     s.errorLog,
	}
}

func (s *Server) rewrite(r *httputil.ProxyRequest) {
	if s.TrustForwardedHeaders {
		// Rewrite drops the visitor's X-Forwarded-* before this hook; a
		// trusted proxy's chain is kept and extended.
		for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
			if v, ok := r.In.Header[h]; ok {
				r.Out.Header[h] = v
			}
		}
		r.SetXForwarded()
		if v, ok := r.In.Header["X-Forwarded-Host"]; ok {
			r.Out.Header["X-Forwarded-Host"] = v
		}
		if v, ok := r.In.Header["X-Forwarded-Proto"]; ok {
			r.Out.Header["X-Forwarded-Proto"] = v
		}
	} else {
		r.SetXForwarded()
	}
	r.Out.URL.Scheme = "https"
	r.Out.URL.Host = r.In.Host
	r.Out.Host = r.In.Host
}

// ServeHTTP is the HTTP frontend: it routes r by host to a group and
// proxies it to one of the group's members. An unknown host is answered
// 502, a group without members 503, each with a short text body.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	g := s.table.Load().lookupHost(groups.NormalizeHost(s.routingHost(r)))
	if g == nil {
		s.Metrics.request("", http.StatusBadGateway, time.Since(start))
		textError(w, bodyUnknownHost, http.StatusBadGateway)
		return
	}
	if isUpgrade(r) {
		status := s.serveUpgrade(w, r, g)
		s.Metrics.request(g.name, status, time.Since(start))
		return
	}
	sw := &statusWriter{ResponseWriter: w}
	g.proxy.ServeHTTP(sw, r)
	s.Metrics.request(g.name, sw.status, time.Since(start))
}

// routingHost is the host a request is routed by.
func (s *Server) routingHost(r *http.Request) string {
	if s.TrustForwardedHeaders {
		if v := r.Header.Get("X-Forwarded-Host"); v != "" {
			// A chain of proxies appends; the first is the visitor's.
			first, _, _ := strings.Cut(v, ",")
			return first
		}
	}
	return r.Host
}

// groupTransport sends requests to the members of one group.
type groupTransport struct {
	s *Server
	g *group
}

// RoundTrip sends the request to a member of its group. A request that
// fails because the member's connection died before any response, and that
// can safely be sent twice, is retried once on another member.
func (t *groupTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	g := t.g
	var tried *member
	for attempt := 0; ; attempt++ {
		m, err := t.s.acquire(req.Context(), g, tried)
		if err != nil {
			if tried != nil && errors.Is(err, errNoMember) {
				return nil, errMemberGone
			}
			return nil, err
		}
		resp, err := m.cc.RoundTrip(req)
		if err != nil {
			g.release(m)
			if attempt == 0 && m.conn.Context().Err() != nil && replayable(req) && req.Context().Err() == nil {
				tried = m
				continue
			}
			return nil, err
		}
		resp.Body = &countedBody{ReadCloser: resp.Body, g: g, m: m}
		return resp, nil
	}
}

var errMemberGone = errors.New("member connection lost")

// replayable reports whether req may be sent again after its member's
// connection died before answering: nothing of it can have been consumed
// when it has no body. Methods do not matter here because the member never
// produced a response; a body, though, may have been read partly.
func replayable(req *http.Request) bool {
	return req.Body == nil || req.Body == http.NoBody
}

// countedBody keeps a request in its member's in-flight count until the
// response body is closed.
type countedBody struct {
	io.ReadCloser
	g    *group
	m    *member
	done bool
}

func (b *countedBody) Close() error {
	if !b.done {
		b.done = true
		b.g.release(b.m)
	}
	return b.ReadCloser.Close()
}

func (t *groupTransport) error(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, errNoMember) {
		textError(w, bodyNoMember, http.StatusServiceUnavailable)
		return
	}
	if errors.Is(err, errBusy) {
		w.Header().Set("Retry-After", "1")
		textError(w, bodyBusy, http.StatusServiceUnavailable)
		return
	}
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		// The visitor went away; nobody reads the answer.
		w.WriteHeader(499)
		return
	}
	t.s.logger().Warn("proxy error", "group", t.g.name, "error", err)
	textError(w, bodyBadGateway, http.StatusBadGateway)
}

func textError(w http.ResponseWriter, body string, code int) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, body)
}

// statusWriter records the status for metrics. It unwraps for
// http.ResponseController, so flushing and hijacking still reach the
// real writer.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// bufferPool recycles the reverse proxies' copy buffers.
type bufferPool struct{ pool sync.Pool }

func (b *bufferPool) Get() []byte {
	if buf, ok := b.pool.Get().(*[]byte); ok {
		return *buf
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.pool.Put(&buf) }
