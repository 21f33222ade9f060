package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

// The data connections' HTTP/1.1 server. Its one client is the tunnel
// server, which sends one request at a time, never an upgrade, an Expect
// or an HTTP/1.0 request, and parses the answer with net/http; so it
// reads requests with http.ReadRequest and writes responses as
// net/http.Server does (the same framing, Content-Length computed for a
// short response, Content-Type sniffed, Date set, trailers), without
// net/http's per-request goroutine: on each request net/http starts a
// goroutine that watches the connection, and stops it once the handler
// has returned, which costs two wake-ups on every hop of a tunnel. Here a
// handler still running after watchAfter gets the watcher; a quicker one
// has no use for learning that its visitor left. The timer that tells is
// armed at most once per watchAfter, not per request: resetting a timer
// wakes the runtime's network poller, which costs a sequential request
// about 9 µs on a 2-core VM.

const (
	// watchAfter is how long a handler runs before the connection is
	// watched for the tunnel server closing it (the visitor left), which
	// cancels the request's context.
	watchAfter = 5 * time.Millisecond
	// maxRequestHeader bounds a request's header, as net/http's default
	// (1 MiB, and its 4 KiB of slack).
	maxRequestHeader = 1<<20 + 4096
	// maxPostHandlerRead is the most of an unread request body that is
	// discarded to keep the connection, as net/http does.
	maxPostHandlerRead = 256 << 10
	// bufferBeforeChunking is how much of a response is held before its
	// header is sent: a response that ends within it gets a
	// Content-Length. net/http holds as much.
	bufferBeforeChunking = 2048
)

// dataServer serves one data connection.
type dataServer struct {
	handler http.Handler
	log     *slog.Logger
	track   func(*batchedTLS, http.ConnState) // on each change but the first
	writers *responseWriters

	conn     *batchedTLS
	limit    requestLimit
	br       *bufio.Reader
	bw       *bufio.Writer
	ctx      context.Context // the tunnel connection's, with net/http's keys
	remote   string
	tls      *tls.ConnectionState
	watch    *time.Timer
	mu       sync.Mutex
	current  *dataResponse // while a handler runs, for the watch timer
	started  time.Time     // when current's handler started
	armed    bool          // watch is pending, or its function running
	deadline bool          // a handler set a deadline, to be lifted
}

// serveConn serves c with the tunnel's handler.
func (d *dataConns) serveConn(c *batchedTLS) {
	s := &dataServer{handler: http.HandlerFunc(d.serveHTTP), log: d.tc.log, track: d.track, writers: &d.writers}
	s.serve(d.tc.conn.Context(), c)
}

// serve serves c until it fails, is closed, or an exchange leaves it
// unusable; a request's context derives from ctx.
func (s *dataServer) serve(ctx context.Context, c *batchedTLS) {
	state := c.ConnectionState()
	s.conn = c
	// As net/http's: the server key tells handlers that a panic with
	// http.ErrAbortHandler cuts the response (httputil.ReverseProxy ends
	// one it could not copy whole as if it were complete without it).
	// The value stands for this server and serves nothing.
	ctx = context.WithValue(ctx, http.ServerContextKey, &http.Server{Handler: s.handler})
	s.ctx = context.WithValue(ctx, http.LocalAddrContextKey, c.LocalAddr())
	s.remote = c.RemoteAddr().String()
	s.tls = &state
	s.limit = requestLimit{r: c, n: -1}
	s.br = bufio.NewReaderSize(&s.limit, 4<<10)
	s.bw = bufio.NewWriterSize(c, 4<<10)
	// Stopped until a request arms it; it then runs until it finds the
	// connection between requests.
	s.watch = time.AfterFunc(time.Hour, s.startWatch)
	s.watch.Stop()
	for {
		switch s.serveOne() {
		case connKeep:
			s.track(c, http.StateIdle)
		case connClose:
			_ = c.Close()
			s.track(c, http.StateClosed)
			return
		case connHijacked:
			return
		}
	}
}

// What becomes of a data connection after an exchange.
const (
	connKeep = iota
	connClose
	connHijacked // the handler's now
)

// serveOne reads a request and answers it; it returns what becomes of the
// connection.
func (s *dataServer) serveOne() int {
	s.limit.n = maxRequestHeader
	req, err := http.ReadRequest(s.br)
	s.limit.n = -1
	if err != nil {
		if errors.Is(err, errRequestHeaderTooLarge) {
			s.refuse(http.StatusRequestHeaderFieldsTooLarge)
		} else if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !isNetError(err) {
			s.log.Debug("malformed request on a data connection", "error", err)
			s.refuse(http.StatusBadRequest)
		}
		return connClose
	}
	s.track(s.conn, http.StateActive)
	if req.ProtoMajor != 1 || req.ProtoMinor != 1 {
		s.refuse(http.StatusHTTPVersionNotSupported)
		return connClose
	}
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	req = req.WithContext(ctx)
	req.RemoteAddr = s.remote
	req.TLS = s.tls
	body := &dataRequestBody{r: req.Body, length: req.ContentLength}
	req.Body = body

	w := &dataResponse{s: s, req: req, header: http.Header{}, contentLength: -1, cancel: cancel, body: body}
	w.w = s.writers.get(w)
	defer s.writers.put(w.w)

	s.mu.Lock()
	s.current = w
	s.started = time.Now()
	arm := !s.armed
	s.armed = true
	s.mu.Unlock()
	if arm {
		s.watch.Reset(watchAfter)
	}
	ok := s.handle(w)
	switch {
	case w.hijacked:
		// Even after a panic, as net/http: the connection is the
		// handler's.
		return connHijacked
	case !ok:
		// As net/http, what the connection's buffer holds goes out
		// before it is closed: the tunnel server sees the response cut
		// rather than none.
		_ = s.bw.Flush()
		return connClose
	case !w.finish():
		return connClose
	}
	return connKeep
}

// handle runs the handler; it reports false when the handler aborted the
// response (http.ErrAbortHandler): the connection is closed then, so that
// the tunnel server sees a cut response rather than a complete one.
func (s *dataServer) handle(w *dataResponse) (ok bool) {
	defer func() {
		if p := recover(); p != nil {
			if p != http.ErrAbortHandler {
				s.log.Error("panic serving a data connection request", "panic", p)
			}
			if !w.hijacked {
				s.unwatch(w)
			}
			ok = false
		}
	}()
	s.handler.ServeHTTP(w, w.req)
	return true
}

// refuse answers a request that cannot be served, before closing the
// connection.
func (s *dataServer) refuse(code int) {
	_ = s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	writeStatusLine(s.bw, code)
	_, _ = s.bw.WriteString("Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n" + http.StatusText(code))
	_ = s.bw.Flush()
}

// startWatch is the watch timer's function: once the handler has read its
// request's body, a goroutine reads the connection, where nothing arrives
// before the response is complete unless the tunnel server closes it.
func (s *dataServer) startWatch() {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.current
	if w == nil || w.watching || w.handlerDone {
		s.armed = false
		return
	}
	if ran := time.Since(s.started); ran < watchAfter {
		// Armed by an earlier request.
		s.watch.Reset(watchAfter - ran)
		return
	}
	if !w.body.done() {
		// The body is the handler's to read: look again later.
		s.watch.Reset(watchAfter)
		return
	}
	s.armed = false
	if s.br.Buffered() > 0 {
		return // not expected from the tunnel server; nothing to watch
	}
	w.watching = true
	w.watched = make(chan struct{})
	go func() {
		n, err := s.conn.Read(s.limit.early[:])
		switch {
		case n > 0:
			// The next request: the response can be whole before its
			// handler returns (a Content-Length flushed), and the tunnel
			// server then sends the next one. Kept for the reader, as
			// net/http keeps it, and not a visitor leaving.
			s.limit.hasEarly = true
		case !errors.Is(err, os.ErrDeadlineExceeded):
			// The connection closed: it cannot carry another exchange.
			w.lost = true
			w.cancel()
		}
		close(w.watched)
	}()
}

// unwatch ends the watch of w's connection, if any, once its handler has
// returned, and before the end of the response goes out: the tunnel
// server may send the next request as soon as it has it.
func (s *dataServer) unwatch(w *dataResponse) {
	s.mu.Lock()
	w.handlerDone = true
	s.current = nil
	watching := w.watching
	s.mu.Unlock()
	if watching {
		_ = s.conn.SetReadDeadline(time.Unix(1, 0))
		<-w.watched
		_ = s.conn.SetReadDeadline(time.Time{})
	}
}

func isNetError(err error) bool {
	var ne net.Error
	return errors.As(err, &ne)
}

// requestLimit bounds what a request's header may read. It is also where
// the watcher leaves the byte it read, read first.
type requestLimit struct {
	r        io.Reader
	n        int64 // bytes left; negative when unlimited
	early    [1]byte
	hasEarly bool // early is the next byte, set by a watcher that has ended
}

func (l *requestLimit) Read(p []byte) (int, error) {
	if l.n == 0 {
		return 0, errRequestHeaderTooLarge
	}
	if l.n > 0 && int64(len(p)) > l.n {
		p = p[:l.n]
	}
	if l.hasEarly && len(p) > 0 {
		l.hasEarly = false
		p[0] = l.early[0]
		if l.n > 0 {
			l.n--
		}
		return 1, nil
	}
	n, err := l.r.Read(p)
	if l.n > 0 {
		l.n -= int64(n)
	}
	return n, err
}

var errRequestHeaderTooLarge = errors.New("request header too large")

var errHandlerReturned = errors.New("client: response written after its handler returned")

// dataRequestBody is a request's body as its handler sees it: it can no
// longer be read once the handler has returned, when the connection's
// reader belongs to the next request.
type dataRequestBody struct {
	mu     sync.Mutex
	r      io.ReadCloser
	length int64 // announced, -1 when unknown
	read   int64
	eof    bool
	closed bool
	cut    bool // closed by the handler with more left than discarded
}

func (b *dataRequestBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, http.ErrBodyReadAfterClose
	}
	if b.eof {
		return 0, io.EOF
	}
	n, err := b.r.Read(p)
	b.read += int64(n)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// Close ends the handler's reads, and discards what is left as net/http
// does: the watch starts from the end of the body, and a handler that
// closes it unread to wait for its visitor should learn it left.
func (b *dataRequestBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		b.closed = true
		b.cut = !b.discard()
	}
	return nil
}

// done reports whether the body has been read to its end, without
// waiting for a read in progress.
func (b *dataRequestBody) done() bool {
	if !b.mu.TryLock() {
		return false
	}
	defer b.mu.Unlock()
	return b.eof || b.r == http.NoBody
}

// finish takes the body from the handler, and reads what it left of it
// so that the connection can carry the next request; it reports false
// when the connection cannot.
func (b *dataRequestBody) finish() bool {
	if !b.mu.TryLock() {
		// A goroutine of the handler's is still reading: only closing
		// the connection stops it.
		return false
	}
	defer b.mu.Unlock()
	if b.cut {
		return false
	}
	if !b.discard() {
		// Not worth waiting for (an upload refused may never come). As
		// net/http, a handler that answered first may still read it.
		return false
	}
	b.closed = true
	return true
}

// discard reads what is left of the body, up to maxPostHandlerRead, and
// reports whether it reached its end; b.mu is held.
func (b *dataRequestBody) discard() bool {
	if b.eof || b.r == http.NoBody {
		return true
	}
	if b.length >= 0 && b.length-b.read >= maxPostHandlerRead {
		return false
	}
	n, err := io.CopyN(io.Discard, b.r, maxPostHandlerRead+1)
	b.read += n
	// At its end, for the watch as for a handler's read.
	b.eof = err == io.EOF
	return b.eof
}

// dataResponse is the http.ResponseWriter of a request on a data
// connection. Its handler's writes go through w (bufferBeforeChunking
// bytes) to Write of its chunkWriter, which sends the header with the
// first of them.
type dataResponse struct {
	s      *dataServer
	req    *http.Request
	body   *dataRequestBody
	cancel context.CancelFunc
	w      *bufio.Writer

	header        http.Header
	calledHeader  bool
	snapshot      http.Header // the header as of WriteHeader, when the handler had it
	wroteHeader   bool        // a final status was set
	status        int
	contentLength int64 // declared or computed, -1 when unknown
	written       int64
	handlerDone   bool // under s.mu
	sentHeader    bool
	chunked       bool
	closeAfter    bool
	fullDuplex    bool
	trailers      []string // declared in a Trailer header
	err           error    // a write to the connection failed

	watching bool // under s.mu
	watched  chan struct{}
	lost     bool // set by the watcher, read once it has ended
	hijacked bool
}

// Hijack implements http.Hijacker as net/http does: a header set with
// WriteHeader is sent, as if the handler were still running (no
// Content-Length), without what the handler wrote of the body, which is
// dropped; the connection is then the handler's, without deadlines.
// (Upgrades do not come this way; see serveHTTP.)
func (w *dataResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked || w.handlerDone {
		return nil, nil, http.ErrHijacked
	}
	if w.wroteHeader && !w.sentHeader {
		// Before unwatch, which marks the handler done.
		w.sendHeader(nil)
	}
	w.s.unwatch(w)
	if w.s.limit.hasEarly {
		// The byte the watcher read goes where the handler looks for
		// what was read ahead, as net/http puts it.
		_, _ = w.s.br.Peek(w.s.br.Buffered() + 1)
	}
	if err := w.s.bw.Flush(); err != nil {
		return nil, nil, err
	}
	w.hijacked = true
	w.s.deadline = false
	_ = w.s.conn.SetDeadline(time.Time{})
	w.s.track(w.s.conn, http.StateHijacked)
	return w.s.conn, bufio.NewReadWriter(w.s.br, bufio.NewWriter(w.s.conn)), nil
}

func (w *dataResponse) Header() http.Header {
	if w.wroteHeader && !w.sentHeader && w.snapshot == nil {
		// As net/http: later changes to this map are for trailers only.
		w.snapshot = w.header.Clone()
	}
	w.calledHeader = true
	return w.header
}

func (w *dataResponse) WriteHeader(code int) {
	if w.hijacked {
		// As net/http: the connection is no longer ours to write to.
		w.s.log.Debug("WriteHeader on a hijacked data connection", "code", code)
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if w.wroteHeader {
		w.s.log.Debug("superfluous WriteHeader call on a data connection", "code", code)
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		// Informational: sent at once; the header map stays the
		// handler's (RFC 8297).
		writeStatusLine(w.s.bw, code)
		_ = w.header.WriteSubset(w.s.bw, excludedNoBody)
		_, _ = w.s.bw.WriteString("\r\n")
		w.fail(w.s.bw.Flush())
		return
	}
	w.wroteHeader = true
	w.status = code
	if w.calledHeader {
		w.snapshot = w.header.Clone()
	}
	if cl := w.header.Get("Content-Length"); cl != "" {
		v, err := strconv.ParseInt(cl, 10, 64)
		if err == nil && v >= 0 {
			w.contentLength = v
		} else {
			w.s.log.Debug("invalid Content-Length set by a handler", "value", cl)
			// As net/http, the length goes from the handler's map only;
			// a snapshot keeps it, and the response is chunked.
			w.header.Del("Content-Length")
		}
	}
}

func (w *dataResponse) Write(p []byte) (int, error) {
	if err := w.beforeWrite(len(p)); err != nil || len(p) == 0 {
		return 0, err
	}
	return w.w.Write(p)
}

// WriteString is Write without a copy. As in net/http, a long string
// leaves in chunks of the buffer's size, where Write sends a long slice
// in one.
func (w *dataResponse) WriteString(s string) (int, error) {
	if err := w.beforeWrite(len(s)); err != nil || len(s) == 0 {
		return 0, err
	}
	return w.w.WriteString(s)
}

// beforeWrite accounts for n bytes the handler writes, or refuses them.
func (w *dataResponse) beforeWrite(n int) error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if w.handlerDone {
		return errHandlerReturned
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if n == 0 {
		return nil
	}
	if !bodyAllowed(w.status) {
		return http.ErrBodyNotAllowed
	}
	w.written += int64(n)
	if w.contentLength != -1 && w.written > w.contentLength {
		return http.ErrContentLength
	}
	return w.err
}

// Flush implements http.Flusher.
func (w *dataResponse) Flush() { _ = w.FlushError() }

// FlushError is http.ResponseController's Flush.
func (w *dataResponse) FlushError() error {
	if w.hijacked {
		// Nothing of ours may reach a connection the handler has (and
		// w.w may serve another response once the handler returns).
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if err := w.w.Flush(); err != nil {
		return err
	}
	if !w.sentHeader {
		w.sendHeader(nil)
	}
	w.fail(w.s.bw.Flush())
	return w.err
}

// SetReadDeadline is http.ResponseController's.
func (w *dataResponse) SetReadDeadline(t time.Time) error {
	w.s.deadline = true
	return w.s.conn.SetReadDeadline(t)
}

// SetWriteDeadline is http.ResponseController's.
func (w *dataResponse) SetWriteDeadline(t time.Time) error {
	w.s.deadline = true
	return w.s.conn.SetWriteDeadline(t)
}

// EnableFullDuplex is http.ResponseController's: the handler reads the
// request body while it answers, which is then not read to its end before
// the response header is sent.
func (w *dataResponse) EnableFullDuplex() error {
	w.fullDuplex = true
	return nil
}

// fail records the first write to the connection that failed, which
// closes it; as net/http, it also cancels the request's context: a
// handler that is not watched (its request's body unread) learns from it
// that its visitor left.
func (w *dataResponse) fail(err error) {
	if err != nil && w.err == nil {
		w.err = err
		_ = w.s.conn.Close()
		w.cancel()
	}
}

// chunkWriter writes the response's body to the connection, with its
// header before the first bytes.
type chunkWriter dataResponse

func (cw *chunkWriter) Write(p []byte) (int, error) {
	w := (*dataResponse)(cw)
	if !w.sentHeader {
		w.sendHeader(p)
	}
	if w.req.Method == http.MethodHead {
		return len(p), nil
	}
	if w.err != nil {
		return 0, w.err
	}
	bw := w.s.bw
	if w.chunked {
		_, _ = bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		_, _ = bw.WriteString("\r\n")
	}
	n, err := bw.Write(p)
	if w.chunked && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	w.fail(err)
	return n, err
}

// sendHeader writes the response header to the connection's buffer, with
// the framing net/http would choose; p is the first part of the body, or
// all of it when the handler has returned.
func (w *dataResponse) sendHeader(p []byte) {
	w.sentHeader = true
	header := w.snapshot
	if header == nil {
		header = w.header
	}
	var exclude map[string]bool
	del := func(k string) {
		if _, ok := header[k]; !ok {
			return
		}
		if exclude == nil {
			exclude = map[string]bool{}
		}
		exclude[k] = true
	}
	trailers := false
	for k := range w.snapshot {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			del(k)
			trailers = true
		}
	}
	for _, v := range w.snapshot["Trailer"] {
		trailers = true
		for _, k := range strings.Split(v, ",") {
			k = http.CanonicalHeaderKey(strings.TrimSpace(k))
			if k != "" && httpguts.ValidTrailerHeader(k) {
				w.trailers = append(w.trailers, k)
			}
		}
	}
	te := header.Get("Transfer-Encoding")
	hasTE := te != ""
	isHEAD := w.req.Method == http.MethodHead
	var extra extraHeader
	if w.handlerDone && !trailers && !hasTE && bodyAllowed(w.status) && !has(header, "Content-Length") && (!isHEAD || len(p) > 0) {
		w.contentLength = int64(len(p))
		extra.contentLength = strconv.Itoa(len(p))
	}
	hasCL := w.contentLength != -1
	if w.req.Close || httpguts.HeaderValuesContainsToken(header["Connection"], "close") {
		w.closeAfter = true
	}
	// As net/http: what the handler left of the request body is read
	// before the answer, so that the connection can carry the next
	// request, unless the handler wants to read on as it answers.
	if w.req.ContentLength != 0 && !w.closeAfter && !w.fullDuplex && !w.body.finish() {
		w.closeAfter = true
	}
	if bodyAllowed(w.status) {
		_, haveType := header["Content-Type"]
		if header.Get("Content-Encoding") == "" && !haveType && !hasTE && len(p) > 0 {
			extra.contentType = http.DetectContentType(p)
		}
	} else {
		del("Content-Length")
		del("Transfer-Encoding")
		if w.status == http.StatusNotModified {
			del("Content-Type")
		}
	}
	if !has(header, "Date") {
		extra.date = time.Now().UTC().Format(http.TimeFormat)
	}
	if hasCL && hasTE && te != "identity" {
		w.s.log.Debug("handler set both Transfer-Encoding and Content-Length", "transfer_encoding", te)
		del("Content-Length")
		hasCL = false
	}
	switch {
	case isHEAD || !bodyAllowed(w.status):
		del("Transfer-Encoding")
	case hasCL:
		del("Transfer-Encoding")
	case te == "identity":
		w.closeAfter = true
		del("Transfer-Encoding")
	default:
		w.chunked = true
		extra.transferEncoding = "chunked"
		if hasTE {
			del("Transfer-Encoding")
		}
	}
	if w.chunked {
		del("Content-Length")
	}
	if w.closeAfter && !httpguts.HeaderValuesContainsToken(header["Connection"], "close") && w.status != http.StatusSwitchingProtocols {
		del("Connection")
		extra.connection = "close"
	}
	bw := w.s.bw
	writeStatusLine(bw, w.status)
	_ = header.WriteSubset(bw, exclude)
	extra.write(bw)
	_, _ = bw.WriteString("\r\n")
}

// extraHeader holds the fields a response header gets besides the
// handler's, written in net/http's order.
type extraHeader struct {
	date, contentLength, contentType, connection, transferEncoding string
}

func (h *extraHeader) write(bw *bufio.Writer) {
	for _, f := range [...]struct{ k, v string }{
		{"Date", h.date},
		{"Content-Length", h.contentLength},
		{"Content-Type", h.contentType},
		{"Connection", h.connection},
		{"Transfer-Encoding", h.transferEncoding},
	} {
		if f.v != "" {
			_, _ = bw.WriteString(f.k)
			_, _ = bw.WriteString(": ")
			_, _ = bw.WriteString(f.v)
			_, _ = bw.WriteString("\r\n")
		}
	}
}

// finish completes the response once the handler has returned, and
// reports whether the connection can carry another exchange.
func (w *dataResponse) finish() bool {
	s := w.s
	s.unwatch(w)
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = w.w.Flush()
	if !w.sentHeader {
		w.sendHeader(nil)
	}
	bw := s.bw
	if w.chunked {
		_, _ = bw.WriteString("0\r\n")
		if t := w.finalTrailers(); t != nil {
			_ = t.Write(bw)
		}
		_, _ = bw.WriteString("\r\n")
	}
	w.fail(bw.Flush())
	w.cancel()
	if s.deadline {
		s.deadline = false
		_ = s.conn.SetDeadline(time.Time{})
	}
	short := w.contentLength != -1 && bodyAllowed(w.status) && w.req.Method != http.MethodHead && w.written != w.contentLength
	return w.err == nil && !w.closeAfter && !w.lost && !short && w.body.finish()
}

// finalTrailers returns the trailers the handler set, if any, as
// net/http would send them.
func (w *dataResponse) finalTrailers() http.Header {
	var t http.Header
	for k, vv := range w.header {
		if kk, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			if t == nil {
				t = http.Header{}
			}
			t[kk] = vv
		}
	}
	for _, k := range w.trailers {
		if t == nil {
			t = http.Header{}
		}
		for _, v := range w.header[k] {
			t.Add(k, v)
		}
	}
	return t
}

func has(h http.Header, k string) bool {
	_, ok := h[k]
	return ok
}

// excludedNoBody are the header fields an informational response does
// not carry.
var excludedNoBody = map[string]bool{"Content-Length": true, "Transfer-Encoding": true}

func writeStatusLine(bw *bufio.Writer, code int) {
	_, _ = bw.WriteString("HTTP/1.1 ")
	_, _ = bw.WriteString(strconv.Itoa(code))
	if text := http.StatusText(code); text != "" {
		_, _ = bw.WriteString(" ")
		_, _ = bw.WriteString(text)
	} else {
		_, _ = bw.WriteString(" status code ")
		_, _ = bw.WriteString(strconv.Itoa(code))
	}
	_, _ = bw.WriteString("\r\n")
}

// bodyAllowed reports whether a response of this status may have a body
// (RFC 9110 §6.4.1).
func bodyAllowed(code int) bool {
	return code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
}

// responseWriters recycles the bufio.Writers that hold the first
// bufferBeforeChunking bytes of a response.
type responseWriters struct{ pool sync.Pool }

func (p *responseWriters) get(w *dataResponse) *bufio.Writer {
	if bw, ok := p.pool.Get().(*bufio.Writer); ok {
		bw.Reset((*chunkWriter)(w))
		return bw
	}
	return bufio.NewWriterSize((*chunkWriter)(w), bufferBeforeChunking)
}

func (p *responseWriters) put(bw *bufio.Writer) {
	bw.Reset(nil)
	p.pool.Put(bw)
}
