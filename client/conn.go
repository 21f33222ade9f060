package client

import (
	"context"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/protocol"
)

// tunnelConn is one registered connection, with its data connections if
// it has some. It is the http.Handler given to the connection's
// http3.Server and to the data connections' http.Server: it counts the
// requests in flight, so that Shutdown can close the connection once none
// is, and it turns a handler panic into a 500.
type tunnelConn struct {
	conn    *quic.Conn
	control *quic.Stream // the register stream, our side still open
	resp    *protocol.RegisterResponse
	handler http.Handler
	log     *slog.Logger
	done    chan struct{} // closed when serving has ended and handlers returned
	dataWG  sync.WaitGroup
	// dataHandlers counts the handlers of data connection requests, which
	// net/http's Close does not wait for, as ServeQUICConn does for its
	// own (see waitDataHandlers).
	dataHandlers sync.WaitGroup

	mu       sync.Mutex
	active   int        // requests whose response is not finished
	draining bool       // Shutdown was called: close when active drops to 0
	data     *dataConns // nil without data connections
	ended    bool       // waitDataHandlers was called
}

func newTunnelConn(conn *quic.Conn, control *quic.Stream, resp *protocol.RegisterResponse, h http.Handler, log *slog.Logger) *tunnelConn {
	return &tunnelConn{
		conn:    conn,
		control: control,
		resp:    resp,
		handler: h,
		log:     log,
		done:    make(chan struct{}),
	}
}

func (tc *tunnelConn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	tc.mu.Lock()
	tc.active++
	data := tc.data
	// One that starts after the wait, on a connection already closed, is
	// too late to be waited for.
	waited := r.ProtoMajor != 3 && !tc.ended
	if waited {
		tc.dataHandlers.Add(1)
	}
	tc.mu.Unlock()
	upgrade := isUpgradeStream(r)
	if data != nil && r.ProtoMajor == 3 && !upgrade {
		data.overflowed()
	}
	// Only once the response is finished may the connection be closed
	// without cutting it short. http3 cancels the request context then
	// (FIN queued or stream reset); net/http flushes the response after the
	// handler has returned, which the linger of closeWhenQuiet covers, and
	// a deferred call spares a goroutine per request.
	if r.ProtoMajor == 3 {
		context.AfterFunc(r.Context(), tc.release)
	} else {
		if waited {
			defer tc.dataHandlers.Done()
		}
		defer tc.release()
	}

	rw := &responseWriter{ResponseWriter: w}
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		if p == http.ErrAbortHandler {
			panic(p)
		}
		tc.log.Error("panic serving tunnel request", "method", r.Method, "path", r.URL.Path, "panic", p, "stack", string(debug.Stack()))
		if rw.wroteHeader {
			// Too late for a status: reset the stream so that the peer
			// does not take a truncated response for a complete one.
			panic(http.ErrAbortHandler)
		}
		// None of what the handler set describes this answer (a
		// Content-Encoding, a Content-Length).
		clear(w.Header())
		http.Error(w, "internal server error", http.StatusInternalServerError)
	}()
	if upgrade {
		serveUpgrade(w, tc.handler, tc.conn, tc.log)
		return
	}
	tc.handler.ServeHTTP(rw, r)
	if r.ProtoMajor == 3 && !rw.streamed && r.Method != http.MethodHead && hasTrailers(w.Header()) {
		// http3 gives a response still unsent when the handler returns a
		// Content-Length, and the tunnel server's HTTP/3 transport reads
		// no trailers after a body of known length: the visitor would
		// lose them. net/http sends a response with trailers without a
		// length; so does a flush.
		_ = http.NewResponseController(w).Flush()
	}
}

// hasTrailers reports whether h declares response trailers, by the Trailer
// header or the http.TrailerPrefix convention.
func hasTrailers(h http.Header) bool {
	if len(h["Trailer"]) > 0 {
		return true
	}
	for k := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			return true
		}
	}
	return false
}

// waitDataHandlers returns once the handlers of data connection requests
// have, when the data connections are closed.
func (tc *tunnelConn) waitDataHandlers() {
	tc.mu.Lock()
	tc.ended = true
	tc.mu.Unlock()
	tc.dataHandlers.Wait()
}

func (tc *tunnelConn) release() {
	tc.mu.Lock()
	tc.active--
	idle := tc.draining && tc.active == 0
	tc.mu.Unlock()
	if idle {
		go tc.closeWhenQuiet()
	}
}

// drain tells the tunnel server to send no new requests and makes the
// connection close as soon as none is in flight.
func (tc *tunnelConn) drain() {
	tc.mu.Lock()
	announce := !tc.draining
	tc.draining = true
	tc.mu.Unlock()
	if announce {
		// A few bytes that fit in any flow-control window; the deadline
		// only guards against a peer that never grants credit.
		_ = tc.control.SetWriteDeadline(time.Now().Add(time.Second))
		if err := protocol.WriteControl(tc.control, &protocol.ControlMessage{Type: protocol.ControlDrain}); err != nil {
			tc.log.Debug("announcing drain failed", "error", err)
		}
	}
	tc.mu.Lock()
	idle := tc.active == 0
	tc.mu.Unlock()
	if idle {
		go tc.closeWhenQuiet()
	}
}

// closeWhenQuiet closes the connection if it is still idle after a
// linger. A finished response may still sit in QUIC's send buffer or await
// retransmission, and CONNECTION_CLOSE would discard it; QUIC offers no
// "all acknowledged" signal, so wait about two probe timeouts, which cover
// a round trip, the peer's ack delay and a retransmission. The same wait
// lets requests the server sent before it read the drain message arrive.
func (tc *tunnelConn) closeWhenQuiet() {
	stats := tc.conn.ConnectionStats()
	linger := 2 * (stats.SmoothedRTT + max(4*stats.MeanDeviation, time.Millisecond) + 25*time.Millisecond)
	if !sleep(tc.conn.Context(), linger) {
		return
	}
	tc.mu.Lock()
	idle := tc.active == 0
	tc.mu.Unlock()
	// When a request arrived meanwhile, its release starts another wait.
	if idle {
		tc.close(reasonShutdown)
	}
}

// close closes the connection and its data connections at once; it is a
// no-op on a closed one.
func (tc *tunnelConn) close(reason string) {
	tc.mu.Lock()
	data := tc.data
	tc.mu.Unlock()
	if data != nil {
		data.close()
	}
	_ = tc.conn.CloseWithError(protocol.CodeOK, reason)
}

func (tc *tunnelConn) isDraining() bool {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.draining
}

// responseWriter records whether the response has started, for the panic
// handler, and forwards the optional interfaces of the http3 writer.
type responseWriter struct {
	http.ResponseWriter
	wroteHeader bool
	streamed    bool // the handler took the HTTP/3 stream over
}

func (w *responseWriter) WriteHeader(code int) {
	if code >= 200 || code == http.StatusSwitchingProtocols {
		w.wroteHeader = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	w.wroteHeader = true
	return w.ResponseWriter.Write(b)
}

// Flush implements http.Flusher.
func (w *responseWriter) Flush() {
	w.wroteHeader = true
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// FlushError is used by http.ResponseController.
func (w *responseWriter) FlushError() error {
	w.wroteHeader = true
	return http.NewResponseController(w.ResponseWriter).Flush()
}

// HTTPStream implements http3.HTTPStreamer, for handlers that take over
// the stream.
func (w *responseWriter) HTTPStream() (*http3.Stream, error) {
	w.wroteHeader = true
	w.streamed = true
	s, ok := w.ResponseWriter.(http3.HTTPStreamer)
	if !ok {
		return nil, http.ErrNotSupported
	}
	return s.HTTPStream()
}

// Unwrap lets http.ResponseController reach the http3 writer's deadlines
// and other extensions.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ReceivedSettings implements http3.Settingser. On a data connection,
// which is HTTP/1.1, it returns a closed channel.
func (w *responseWriter) ReceivedSettings() <-chan struct{} {
	if s, ok := w.ResponseWriter.(http3.Settingser); ok {
		return s.ReceivedSettings()
	}
	return closedChan
}

// Settings implements http3.Settingser. On a data connection, which is
// HTTP/1.1, it returns the zero Settings.
func (w *responseWriter) Settings() *http3.Settings {
	if s, ok := w.ResponseWriter.(http3.Settingser); ok {
		return s.Settings()
	}
	return &http3.Settings{}
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// querylessHandler passes http3's log lines on without the query string of
// the request URI that its per-request debug line carries: a visitor's
// query may hold a secret (an access token), and the Server's own lines
// name a request by its path only.
type querylessHandler struct{ slog.Handler }

func (h querylessHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "uri" {
			path, _, _ := strings.Cut(a.Value.String(), "?")
			a.Value = slog.StringValue(path)
		}
		out.AddAttrs(a)
		return true
	})
	return h.Handler.Handle(ctx, out)
}

func (h querylessHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return querylessHandler{h.Handler.WithAttrs(attrs)}
}

func (h querylessHandler) WithGroup(name string) slog.Handler {
	return querylessHandler{h.Handler.WithGroup(name)}
}
