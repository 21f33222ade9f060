package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http/httpguts"
)

// forward proxies r to a member of g. It behaves as httputil.ReverseProxy
// with the server's rewrite (hop-by-hop headers dropped, X-Forwarded-*
// set, the visitor's Host kept, trailers and 1xx responses passed on) but
// costs less per request: it builds the outgoing request directly instead
// of cloning r, sends body-less requests on a request stream without the
// transport's per-request goroutine, and flushes only responses that
// stream (unknown length, server-sent events).
//
// It returns the status the visitor got. abort is set when the response
// broke off after its header was sent; the caller then panics with
// http.ErrAbortHandler, so that the visitor sees a cut connection rather
// than a complete-looking response.
func (s *Server) forward(w http.ResponseWriter, r *http.Request, g *group) (status int, abort bool) {
	s.proxyOnce.Do(s.initProxy)
	ctx := r.Context()
	out := s.outgoing(r)
	if b, ok := out.Body.(*handlerBody); ok {
		b.ctl = http.NewResponseController(w)
		b.timeout = s.ReceiveTimeout
		if b.timeout <= 0 {
			b.timeout = DefaultReceiveTimeout
		}
	}
	if out.Body != nil {
		// The transport may read on after this handler has returned.
		defer out.Body.Close()
	}
	// RFC 9110 §15.2: no 1xx response to an HTTP/1.0 visitor, who
	// would take it for the final one.
	hints := w
	if !r.ProtoAtLeast(1, 1) {
		hints = no1xx{w}
	}
	var tried *member
	for attempt := 0; ; attempt++ {
		m, err := s.acquire(ctx, g, tried)
		if err != nil && tried != nil && errors.Is(err, errNoMember) && tried.usable() {
			// Only the member's data connection broke; QUIC may still work.
			m, err = s.acquire(ctx, g, nil)
		}
		if err != nil {
			if tried != nil && errors.Is(err, errNoMember) {
				err = errMemberGone
			}
			return s.proxyError(w, r, g, err), false
		}
		var (
			res  *http.Response
			stop func() bool
			lost bool
		)
		var dc *dataConn
		if out.Method != http.MethodConnect {
			// HTTP/1.1 writes a CONNECT body raw, without a length or
			// chunking: the member would parse it as further requests.
			dc = m.data.get()
		}
		for dc != nil && dc.stale() {
			// A request that must not run twice cannot learn the hard way
			// that the member closed this connection while it was idle;
			// and bytes the member sent after its last answer, once that
			// was checked, would be read as this request's answer, which
			// no retry would notice.
			m.data.discard(dc)
			dc = m.data.get()
		}
		if dc != nil {
			// A failure before the response header, other than an answer
			// the member got wrong, is the connection's.
			res, err = s.roundTripData(ctx, hints, &m.data, dc, out)
			lost = err != nil && !errors.Is(err, errHeaderTooLarge) && !errors.Is(err, errBad1xx)
		} else {
			res, stop, err = s.exchange(ctx, hints, m, out)
			lost = err != nil && connectionLost(m, err)
		}
		if err != nil {
			g.release(m)
			// The member's connection died before answering: a request
			// without a body that is safe to repeat, or that never reached
			// the member, is sent once more, preferably to another member.
			if attempt == 0 && lost && ctx.Err() == nil && (replayable(out) || out.Body == nil && errors.Is(err, errNotSent)) {
				tried = m
				continue
			}
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return s.proxyError(w, r, g, err), false
		}
		if res.StatusCode < 100 || res.StatusCode > 999 {
			// HTTP/3 and HTTP/1.1 parsers let it through; net/http's
			// WriteHeader would panic on it.
			_ = res.Body.Close()
			if stop != nil {
				stop()
			}
			g.release(m)
			return s.proxyError(w, r, g, fmt.Errorf("%w: %d", errBadStatus, res.StatusCode)), false
		}
		// A visitor who left as the answer came reads none of it.
		left := ctx.Err()
		if left == nil {
			// A visitor's unread body would make net/http's first flush
			// wait for it, holding the member's slot: the early flush is
			// for requests without one.
			abort = s.respond(w, g, res, r.ProtoMajor == 1 && out.Body == nil)
		}
		_ = res.Body.Close()
		if stop != nil {
			stop()
		}
		g.release(m)
		if left != nil {
			return s.proxyError(w, r, g, left), false
		}
		return res.StatusCode, abort
	}
}

// flushSized sends the visitor a response of declared length that has
// been written whole, rather than after the bookkeeping that ends the
// handler. One without a declared length is left to net/http, which sets
// the length it counts if the handler ends before a flush; HTTP/2 would
// spend a frame on the end of the stream.
func flushSized(w http.ResponseWriter, arm func()) {
	if _, ok := w.Header()["Content-Length"]; !ok {
		return
	}
	if f, ok := w.(http.Flusher); ok {
		arm()
		f.Flush()
	}
}

var errMemberGone = errors.New("member connection lost")

var errBadStatus = errors.New("member answered with an invalid status code")

// errNotSent marks a failure before the member can have seen the whole
// request, which makes it safe to send again whatever its method.
var errNotSent = errors.New("request not sent")

// replayable reports whether out may be sent again after its member's
// connection died with no answer, when the member may have acted on it:
// it has no body to have been consumed, and its method is safe, or an
// idempotency key (non-standard but widespread) lets the member recognise
// the repeat. net/http's Transport draws the same line.
func replayable(out *http.Request) bool {
	if out.Body != nil {
		return false
	}
	switch out.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, key := out.Header["Idempotency-Key"]
	_, xkey := out.Header["X-Idempotency-Key"]
	return key || xkey
}

// connectionLost reports whether err means that m's connection is gone,
// rather than that this one request failed. The connection's context is
// cancelled a moment after its streams see the close, so the error itself
// is asked too: every connection-level QUIC error ends the connection.
func connectionLost(m *member, err error) bool {
	if m.conn.Context().Err() != nil {
		return true
	}
	var (
		app       *quic.ApplicationError
		idle      *quic.IdleTimeoutError
		reset     *quic.StatelessResetError
		transport *quic.TransportError
	)
	return errors.As(err, &app) || errors.As(err, &idle) || errors.As(err, &reset) || errors.As(err, &transport)
}

// max1xx bounds the informational responses passed on for one request, as
// the HTTP/3 transport does.
const max1xx = 5

// exchange sends out to m and returns the final response. A body-less
// request goes on a request stream of its own, cancelled by stop's
// registration when the visitor leaves; stop must be called once the
// response is done with. A request with a body needs the transport, which
// sends the body in the background.
func (s *Server) exchange(ctx context.Context, w http.ResponseWriter, m *member, out *http.Request) (res *http.Response, stop func() bool, err error) {
	if out.Body != nil {
		res, err := s.roundTrip(ctx, w, m.cc, out)
		return res, nil, err
	}
	str, err := m.cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", errNotSent, err)
	}
	stop = context.AfterFunc(ctx, func() {
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
	})
	res, err = readFinal(w, str, out)
	if err != nil {
		stop()
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		return nil, nil, err
	}
	return res, stop, nil
}

// readFinal sends out on str and reads the member's final response,
// passing informational ones on to the visitor.
func readFinal(w http.ResponseWriter, str *http3.RequestStream, out *http.Request) (*http.Response, error) {
	if err := str.SendRequestHeader(out); err != nil {
		// A header cut short is no request to the member.
		return nil, fmt.Errorf("%w: %w", errNotSent, err)
	}
	// The request is out; closing only ends it. A member that answered
	// before the end arrived may have stopped reading already, which fails
	// Close and nothing else, as in the transport's RoundTrip.
	_ = str.Close()
	for n := 0; ; n++ {
		res, err := str.ReadResponse()
		if err != nil {
			return nil, err
		}
		if res.StatusCode < 100 || res.StatusCode > 199 {
			return res, nil
		}
		if res.StatusCode == http.StatusSwitchingProtocols || n == max1xx {
			return nil, errBad1xx
		}
		pass1xx(w, res.StatusCode, res.Header)
	}
}

var errBad1xx = errors.New("member answered with too many or unexpected 1xx responses")

// roundTrip sends a request with a body through rt, a member's HTTP/3
// connection. 1xx responses reach the visitor through a trace hook, which
// the transport calls on this goroutine before RoundTrip returns.
func (s *Server) roundTrip(ctx context.Context, w http.ResponseWriter, rt http.RoundTripper, out *http.Request) (*http.Response, error) {
	trace := &httptrace.ClientTrace{
		Got1xxResponse: func(code int, header textproto.MIMEHeader) error {
			pass1xx(w, code, http.Header(header))
			return nil
		},
	}
	res, err := rt.RoundTrip(out.WithContext(httptrace.WithClientTrace(ctx, trace)))
	if err != nil {
		return nil, err
	}
	if res.StatusCode == http.StatusSwitchingProtocols {
		_ = res.Body.Close()
		return nil, errBad1xx
	}
	return res, nil
}

// pass1xx sends an informational response to the visitor. The header map
// is cleared afterwards: unlike a final response, a 1xx one does not
// consume it.
func pass1xx(w http.ResponseWriter, code int, header http.Header) {
	h := w.Header()
	for k, vv := range header {
		h[k] = append(h[k], vv...)
	}
	w.WriteHeader(code)
	clear(h)
}

// respond copies res to the visitor and reports whether it broke off after
// the header was sent. The caller closes res.Body. flushEnd sends a
// complete response of declared length at once (see flushSized).
func (s *Server) respond(w http.ResponseWriter, g *group, res *http.Response, flushEnd bool) (abort bool) {
	// Each write gets the SendTimeout, give or take a tenth; the deadline
	// is lifted at the end, for it would outlive the response on a
	// kept-alive HTTP/1 connection.
	ctl := http.NewResponseController(w)
	sendTimeout := s.SendTimeout
	if sendTimeout <= 0 {
		sendTimeout = DefaultSendTimeout
	}
	var armed time.Time
	defer func() {
		if !armed.IsZero() {
			_ = ctl.SetWriteDeadline(time.Time{})
		}
	}()
	arm := func() {
		if now := time.Now(); now.Sub(armed) > min(time.Second, sendTimeout/10) {
			_ = ctl.SetWriteDeadline(now.Add(sendTimeout))
			armed = now
		}
	}

	removeHopByHop(res.Header)
	h := w.Header()
	for k, vv := range res.Header {
		if prior, ok := h[k]; ok {
			h[k] = append(prior, vv...)
		} else {
			// res is ours alone: its values can be shared, not copied.
			h[k] = vv
		}
	}
	announced := len(res.Trailer)
	if announced > 0 {
		keys := make([]string, 0, announced)
		for k := range res.Trailer {
			keys = append(keys, k)
		}
		h.Add("Trailer", strings.Join(keys, ", "))
	}
	w.WriteHeader(res.StatusCode)

	// A response of known length is written when the handler returns or
	// the buffer fills; one that streams is flushed as it arrives, and its
	// header at once, so that the visitor sees the stream begin.
	stream := streams(res)
	if stream {
		arm()
		_ = ctl.Flush()
	}
	pool := s.buffers
	if res.ContentLength >= bulkSize {
		pool = s.bulkBuffers
	}
	buf := pool.get()
	defer pool.put(buf)
	// A body that says more is at hand is read on before writing: TLS
	// returns at most a record (16 KiB) per read, and each write to the
	// visitor is a system call.
	more, _ := res.Body.(interface{ buffered() bool })
	filled := 0
	for {
		n, rerr := res.Body.Read((*buf)[filled:])
		filled += n
		if rerr == nil && !stream && more != nil && filled < len(*buf) && more.buffered() {
			continue
		}
		if filled > 0 {
			arm()
			if _, werr := w.Write((*buf)[:filled]); werr != nil {
				return true
			}
			filled = 0
			if stream {
				_ = ctl.Flush()
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if !errors.Is(rerr, context.Canceled) {
				s.logger().Warn("reading the member's response", "group", g.name, "error", rerr)
			}
			return true
		}
	}
	// The transport fills res.Trailer once the body has been read to its
	// end.
	if len(res.Trailer) == 0 {
		if flushEnd {
			flushSized(w, arm)
		}
		return false
	}
	// Force chunking, so that net/http does not compute a Content-Length
	// for a short body and drop the trailers.
	arm()
	_ = ctl.Flush()
	if len(res.Trailer) == announced {
		for k, vv := range res.Trailer {
			h[k] = append(h[k], vv...)
		}
		return false
	}
	for k, vv := range res.Trailer {
		k = http.TrailerPrefix + k
		h[k] = append(h[k], vv...)
	}
	return false
}

// streams reports whether res is to be flushed as it arrives: server-sent
// events and bodies of unknown length.
func streams(res *http.Response) bool {
	if res.ContentLength == -1 {
		return true
	}
	ct := res.Header.Get("Content-Type")
	if ct == "" {
		return false
	}
	base, _, _ := mime.ParseMediaType(ct)
	return base == "text/event-stream"
}

// outgoing builds the request sent to a member: r's method, target, Host
// and end-to-end headers, with X-Forwarded-For, -Host and -Proto set as
// httputil.ProxyRequest.SetXForwarded does (extended rather than replaced
// when the server trusts them), Forwarded dropped, and no User-Agent added.
// Header values are shared with r, never modified.
func (s *Server) outgoing(r *http.Request) *http.Request {
	in := r.Header
	h := make(http.Header, len(in)+3)
	for k, vv := range in {
		if !isHopHeader(k) {
			h[k] = vv
		}
	}
	deleteListed(h, in["Connection"])
	// The frontend answered the visitor's expectation already.
	delete(h, "Expect")
	// Tell the member that the visitor accepts trailers, as it asked.
	if httpguts.HeaderValuesContainsToken(in["Te"], "trailers") {
		h["Te"] = []string{"trailers"}
	}
	s.setForwarded(h, r)
	if _, ok := h["User-Agent"]; !ok {
		// An empty value keeps the transport from adding its own.
		h["User-Agent"] = []string{""}
	}

	u := *r.URL
	u.Scheme = "https"
	u.Host = r.Host
	u.RawQuery = cleanQuery(u.RawQuery)
	out := &http.Request{
		Method:     r.Method,
		URL:        &u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     h,
		Host:       r.Host,
	}
	if r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		// net/http lists the announced trailers as keys of r.Trailer
		// before the body is read.
		out.Body = &handlerBody{r: r.Body, trailer: r.Trailer, announced: slices.Collect(maps.Keys(r.Trailer))}
		out.ContentLength = r.ContentLength
		// The map is r's own: the server fills in the values once the
		// body has been read, which is when the transport sends them.
		out.Trailer = r.Trailer
		if len(r.Trailer) > 0 {
			// HTTP/1.1 carries trailers only after a chunked body; an
			// HTTP/2 or /3 visitor may announce both them and a length.
			out.ContentLength = -1
		}
	}
	return out
}

// setForwarded sets X-Forwarded-For, -Host and -Proto in h, the header
// sent to a member for r, as httputil.ProxyRequest.SetXForwarded does:
// the visitor's values are replaced, or extended when the server trusts
// them. Forwarded, which the member could mistake for ours, is dropped.
func (s *Server) setForwarded(h http.Header, r *http.Request) {
	in := r.Header
	delete(h, "Forwarded")
	delete(h, "X-Forwarded-For")
	delete(h, "X-Forwarded-Host")
	delete(h, "X-Forwarded-Proto")

	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		if prior := in["X-Forwarded-For"]; s.TrustForwardedHeaders && len(prior) > 0 {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	if v, ok := in["X-Forwarded-Host"]; ok && s.TrustForwardedHeaders {
		h["X-Forwarded-Host"] = v
	} else {
		h["X-Forwarded-Host"] = []string{r.Host}
	}
	if v, ok := in["X-Forwarded-Proto"]; ok && s.TrustForwardedHeaders {
		h["X-Forwarded-Proto"] = v
	} else if r.TLS == nil {
		h["X-Forwarded-Proto"] = []string{"http"}
	} else {
		h["X-Forwarded-Proto"] = []string{"https"}
	}
}

// isHopHeader reports whether the canonical header key k is hop-by-hop:
// it describes one connection and is not forwarded.
func isHopHeader(k string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// removeHopByHop deletes the hop-by-hop headers of h, including those the
// Connection header lists.
func removeHopByHop(h http.Header) {
	deleteListed(h, h["Connection"])
	for k := range h {
		if isHopHeader(k) {
			delete(h, k)
		}
	}
}

// deleteListed deletes from h the headers that the Connection header
// values name: they describe the visitor's connection only.
func deleteListed(h http.Header, connection []string) {
	for _, f := range connection {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
}

// cleanQuery drops the query parameters a member might parse differently
// from the server (semicolons, bad escapes, too many), as
// httputil.ReverseProxy does, and escapes the bytes an HTTP/2 visitor may
// send raw but an HTTP/1.1 request line cannot carry (a space).
func cleanQuery(s string) string {
	reencode := func(s string) string {
		v, _ := url.ParseQuery(s)
		return v.Encode()
	}
	if strings.Count(s, "&")+1 > maxQueryParams {
		return reencode(s)
	}
	for i := 0; i < len(s); {
		if s[i] <= ' ' || s[i] == 0x7f {
			return reencode(s)
		}
		switch s[i] {
		case ';':
			return reencode(s)
		case '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return reencode(s)
			}
			i += 3
		default:
			i++
		}
	}
	return s
}

// maxQueryParams is net/url's default limit on query parameters.
const maxQueryParams = 10000

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// handlerBody is the visitor's request body as the transport sees it. The
// transport closes the body it sends and may read it after the handler has
// returned, when the server has recycled it; Close therefore only cuts off
// further reads, and the server closes the real body itself.
type handlerBody struct {
	r      io.ReadCloser
	closed atomic.Bool
	// Each read gets the ReceiveTimeout; the deadline is lifted at the end
	// of the body, so that it cannot cut the response.
	mu        sync.Mutex // ctl is used only before Close
	ctl       *http.ResponseController
	timeout   time.Duration
	trailer   http.Header
	announced []string
}

func (b *handlerBody) Read(p []byte) (int, error) {
	if !b.deadline(time.Now().Add(b.timeout)) {
		return 0, errBodyClosed
	}
	n, err := b.r.Read(p)
	if err != nil {
		b.deadline(time.Time{})
	}
	if err == io.EOF && b.trailer != nil {
		filterTrailer(b.trailer, b.announced)
	}
	return n, err
}

// deadline sets the visitor's read deadline to t unless the body is
// closed: the handler has returned then, or is about to, and its
// ResponseWriter is no longer to be used.
func (b *handlerBody) deadline(t time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed.Load() {
		return false
	}
	if b.ctl != nil {
		_ = b.ctl.SetReadDeadline(t)
	}
	return true
}

// filterTrailer keeps the trailer fields the visitor announced and that
// may be sent in trailers (RFC 9110 §6.5.1).
func filterTrailer(t http.Header, announced []string) {
	ok := map[string]bool{}
	for _, k := range announced {
		ok[k] = true
	}
	for k := range t {
		if !ok[k] || !httpguts.ValidTrailerHeader(k) || strings.HasPrefix(k, "X-Forwarded-") || k == "Forwarded" {
			delete(t, k)
		}
	}
}

func (b *handlerBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed.Store(true)
	return nil
}

var errBodyClosed = errors.New("read on a closed request body")

// no1xx is the writer informational responses go to for a visitor that
// cannot take them: they are dropped.
type no1xx struct{ http.ResponseWriter }

func (no1xx) WriteHeader(int) {}
