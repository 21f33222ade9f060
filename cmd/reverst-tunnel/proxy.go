package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

// forwardedHeaders are set by the tunnel server for the visitor.
// ReverseProxy's Rewrite starts without them; they are passed on as they
// came, since the tunnel is the proxy the local service should believe.
var forwardedHeaders = [...]string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

// newProxy returns the handler that forwards tunnel requests to target.
// hostHeader is hostPreserve (the visitor's Host, as the tunnel server
// received it), hostRewrite (target's host) or a literal Host value.
func newProxy(target *url.URL, hostHeader string, log *slog.Logger) http.Handler {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// The target is local: an HTTP_PROXY meant for the outside world must
	// not apply. Every request goes to one host, so keep enough idle
	// connections for the concurrency the tunnel brings.
	transport.Proxy = nil
	transport.MaxIdleConnsPerHost = 100
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			for _, h := range forwardedHeaders {
				if v, ok := pr.In.Header[h]; ok {
					pr.Out.Header[h] = v
				}
			}
			switch hostHeader {
			case hostPreserve:
				pr.Out.Host = pr.In.Host
			case hostRewrite:
				// SetURL cleared Out.Host: the target's host is sent.
			default:
				pr.Out.Host = hostHeader
			}
		},
		Transport: transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			level := slog.LevelWarn
			if errors.Is(err, context.Canceled) {
				level = slog.LevelDebug // the visitor went away
			}
			log.Log(r.Context(), level, "forwarding to the local service failed", "method", r.Method, "path", r.URL.Path, "target", target.Redacted(), "error", err)
			http.Error(w, "reverst-tunnel: local service unavailable", http.StatusBadGateway)
		},
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
}

// logRequests logs every request at debug level, without its query
// string, which may carry secrets.
func logRequests(next http.Handler, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !log.Enabled(r.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		if sw.status == 0 {
			sw.status = http.StatusOK
			if r.Header.Get("Upgrade") != "" {
				// ReverseProxy hijacked the connection and wrote the 101
				// itself.
				sw.status = http.StatusSwitchingProtocols
			}
		}
		log.Debug("request", "method", r.Method, "host", r.Host, "path", r.URL.Path, "status", sw.status, "bytes", sw.bytes, "duration", time.Since(start).Round(time.Microsecond))
	})
}

// statusWriter records the status and size of a response. Flushing and
// the other optional interfaces are reached through Unwrap by
// http.ResponseController, which ReverseProxy uses.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
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
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
