package tunnel

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/reverst-dev/reverst/internal/rawsock"
	"github.com/reverst-dev/reverst/protocol"
)

// Data connections (see package protocol) carry plain requests to members
// over HTTP/1.1 on TCP, one request at a time per connection. They cost
// a fraction of what quic-go costs per byte and per request, and a request
// on one crosses no goroutine of ours but its own.

// Limits of a member's data connections.
const (
	// maxDataConns bounds the data connections of one member; more are
	// refused.
	maxDataConns = 256
	// maxIdleData bounds the idle ones; more are closed as they become
	// idle.
	maxIdleData = 64
	// dataIdleTimeout closes a connection unused for that long, before a
	// middlebox forgets it and a request finds it dead.
	dataIdleTimeout = 30 * time.Second
)

// ServeData accepts data connections (see package protocol) from ln, a
// TCP listener, until ln fails or the server is shut down: it runs TLS
// with config, whose NextProtos is replaced by protocol.DataALPN, and
// gives each connection to the member whose token it presents. Members are
// offered data connections when Server.DataConnections is set.
//
// It always returns a non-nil error; after Shutdown or Close, or once ln
// is closed, it is ErrServerClosed. The caller keeps ownership of ln and
// closes it; data connections already accepted end with their members.
func (s *Server) ServeData(ln net.Listener, config *tls.Config) error {
	config = config.Clone()
	config.NextProtos = []string{protocol.DataALPN}
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return ErrServerClosed
			}
			if passing(err) {
				// Out of file descriptors, say, under a flood of
				// connections: ending here would stop the whole server
				// and drop every tunnel. Wait for some to close, as
				// net/http's Serve does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.logger().Warn("accepting data connections failed; retrying", "error", err, "retry_in", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("tunnel: accepting data connections: %w", err)
		}
		delay = 0
		if !s.pending.enter(c.RemoteAddr()) {
			s.Metrics.dataConn("refused")
			s.logger().Debug("data connection refused: too many in their hello", "remote", c.RemoteAddr().String())
			_ = c.Close()
			continue
		}
		raw := newReadBatcher(c, &s.readBufs)
		go s.handleData(tls.Server(raw, config), raw)
	}
}

// passing reports whether an accept error is one that goes away: the
// process or the system out of file descriptors or memory, a connection
// aborted before it was accepted, a timeout.
func passing(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// Listen opens a tunnel address: the UDP socket for QUIC (for Serve,
// through a quic.Transport) and, on the same address and port, the TCP
// listener for ServeData, since clients open their data connections to the
// port their QUIC connection reached. With port 0 the UDP port is chosen
// first, and the pair is tried again if that port is taken for TCP.
func Listen(address string) (*net.UDPConn, net.Listener, error) {
	udpAddr, err := net.ResolveUDPAddr("udp", address)
	if err != nil {
		return nil, nil, err
	}
	for attempt := 0; ; attempt++ {
		udp, err := net.ListenUDP("udp", udpAddr)
		if err != nil {
			return nil, nil, err
		}
		bound := udp.LocalAddr().(*net.UDPAddr)
		tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: udpAddr.IP, Port: bound.Port, Zone: udpAddr.Zone})
		if err == nil {
			return udp, tcp, nil
		}
		_ = udp.Close()
		if udpAddr.Port != 0 || attempt == 10 {
			return nil, nil, fmt.Errorf("data connections (TCP): %w", err)
		}
	}
}

// handleData runs the hello on c and gives it to its member.
func (s *Server) handleData(c *tls.Conn, raw *readBatcher) {
	m, err := s.dataHello(c)
	s.pending.leave(c.RemoteAddr())
	if err == nil && !m.data.add(c, raw) {
		err = errors.New("member gone or at its data connection limit")
	}
	if err != nil {
		s.Metrics.dataConn("refused")
		s.logger().Debug("data connection refused", "remote", c.RemoteAddr().String(), "error", err)
		_ = c.Close()
		return
	}
	s.Metrics.dataConn("ok")
}

// dataHello checks that c is a data connection of a live member, and
// accepts it.
func (s *Server) dataHello(c *tls.Conn) (*member, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.registerTimeout())
	defer cancel()
	deadline, _ := ctx.Deadline()
	_ = c.SetDeadline(deadline)
	if err := c.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	token, err := protocol.ReadDataHello(c)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	m := s.tokens[token]
	s.mu.Unlock()
	if m == nil {
		return nil, errors.New("unknown token")
	}
	if _, err := c.Write([]byte{protocol.DataOK}); err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return m, nil
}

// offerData returns the token that lets m open data connections, or ""
// when the member did not ask for them or the server offers none.
func (s *Server) offerData(m *member, want string) string {
	if want != protocol.DataHTTP1 || !s.DataConnections {
		return ""
	}
	token := protocol.NewDataToken()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tokens == nil {
		s.tokens = map[string]*member{}
	}
	s.tokens[token] = m
	m.token = token
	return token
}

// dropData forgets m's token and closes its data connections; m has left.
func (s *Server) dropData(m *member) {
	if m.token != "" {
		s.mu.Lock()
		delete(s.tokens, m.token)
		s.mu.Unlock()
	}
	m.data.close()
}

// dataConn is a data connection, idle in its pool or carrying one request.
type dataConn struct {
	conn      *tls.Conn
	raw       *readBatcher // under conn
	limit     headerLimit  // between conn and br
	idleSince time.Time
	// br and bw are borrowed from dataBufs for an exchange, so that idle
	// connections hold none.
	br *bufio.Reader
	bw *bufio.Writer
}

// stale reports whether dc, idle in its pool, was closed by the member or
// holds bytes nobody asked for. It costs a system call, which every
// request pays: the check at the end of an exchange (dataBody.Close) sees
// only what had been read off the socket by then, and bytes still in it,
// or arriving since, would be read as the next request's answer.
func (dc *dataConn) stale() bool {
	if dc.raw.buf != nil {
		return true
	}
	if dc.raw.rc == nil {
		return false // where the socket cannot be peeked at
	}
	var closed bool
	if err := dc.raw.rc.Read(func(fd uintptr) bool {
		closed = peekClosed(fd)
		return true // never wait
	}); err != nil {
		return true
	}
	return closed
}

// readAhead reports whether TLS holds a record that nobody asked for, or
// the connection failed: tls.Conn reads ahead of what it returns. The read
// does not wait: with its deadline passed, a read that would reach the
// socket fails at once, and TLS does not take that failure for a broken
// connection. A record still arriving in part goes unseen.
func (dc *dataConn) readAhead() bool {
	var one [1]byte
	_ = dc.conn.SetReadDeadline(time.Unix(1, 0)) // passed long ago
	n, err := dc.conn.Read(one[:])
	_ = dc.conn.SetReadDeadline(time.Time{})
	return n > 0 || err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// dataBufs recycles the buffered readers and writers of exchanges on data
// connections.
type dataBufs struct{ r, w sync.Pool }

func (b *dataBufs) reader(src io.Reader) *bufio.Reader {
	if br, ok := b.r.Get().(*bufio.Reader); ok {
		br.Reset(src)
		return br
	}
	return bufio.NewReader(src)
}

func (b *dataBufs) writer(dst io.Writer) *bufio.Writer {
	if bw, ok := b.w.Get().(*bufio.Writer); ok {
		bw.Reset(dst)
		return bw
	}
	return bufio.NewWriter(dst)
}

// release takes dc's buffers back; its writer only when no goroutine may
// still be writing with it.
func (b *dataBufs) release(dc *dataConn, writerDone bool) {
	if dc.br != nil {
		dc.br.Reset(nil)
		b.r.Put(dc.br)
		dc.br = nil
	}
	if dc.bw != nil && writerDone {
		dc.bw.Reset(nil)
		b.w.Put(dc.bw)
	}
	dc.bw = nil
}

// dataPool holds a member's data connections. The zero value is an empty
// pool.
type dataPool struct {
	mu     sync.Mutex
	idle   []*dataConn // the most recently used last
	all    map[*dataConn]struct{}
	closed bool
}

// add puts a new connection in the pool; it reports false when the pool
// is closed or full.
func (p *dataPool) add(c *tls.Conn, raw *readBatcher) bool {
	now := time.Now()
	dc := &dataConn{conn: c, raw: raw, limit: headerLimit{r: c, n: -1}, idleSince: now}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.sweepLocked(now)
	if len(p.all) >= maxDataConns {
		return false
	}
	if p.all == nil {
		p.all = map[*dataConn]struct{}{}
	}
	p.all[dc] = struct{}{}
	p.idle = append(p.idle, dc)
	return true
}

// sweepLocked closes the idle connections that expired or went stale. A
// member dials a connection to replace one that went while idle (a
// middlebox reset it, its host closed it), and only a request would find
// the dead one otherwise: on a quiet tunnel they would pile up, a
// descriptor each, up to maxDataConns. A system call per idle connection
// is cheap at the rate members dial.
func (p *dataPool) sweepLocked(now time.Time) {
	p.expireLocked(now)
	live := p.idle[:0]
	for _, dc := range p.idle {
		if dc.stale() {
			p.dropLocked(dc)
			continue
		}
		live = append(live, dc)
	}
	clear(p.idle[len(live):])
	p.idle = live
}

// get takes the most recently used idle connection, or returns nil.
// Connections idle for too long are closed on the way.
func (p *dataPool) get() *dataConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expireLocked(time.Now())
	n := len(p.idle)
	if n == 0 {
		return nil
	}
	dc := p.idle[n-1]
	p.idle = p.idle[:n-1]
	return dc
}

// put returns dc to the idle connections after a complete exchange.
func (p *dataPool) put(dc *dataConn) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.idle) >= maxIdleData {
		p.dropLocked(dc)
		return
	}
	dc.idleSince = now
	p.idle = append(p.idle, dc)
	p.expireLocked(now)
}

// discard closes dc, whose state is unknown after a failed exchange.
func (p *dataPool) discard(dc *dataConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropLocked(dc)
}

func (p *dataPool) expireLocked(now time.Time) {
	for len(p.idle) > 0 && now.Sub(p.idle[0].idleSince) > dataIdleTimeout {
		p.dropLocked(p.idle[0])
		p.idle = p.idle[1:]
	}
}

func (p *dataPool) dropLocked(dc *dataConn) {
	delete(p.all, dc)
	_ = dc.conn.Close()
}

// closeIdle closes the idle connections: the member is draining, and
// connections in use finish their request.
func (p *dataPool) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, dc := range p.idle {
		p.dropLocked(dc)
	}
	p.idle = nil
}

// close closes every connection and refuses new ones.
func (p *dataPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for dc := range p.all {
		p.dropLocked(dc)
	}
	p.idle = nil
}

// size returns the number of open connections.
func (p *dataPool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.all)
}

// roundTripData sends out on dc and returns the final response, passing
// informational ones on to the visitor. The response body gives dc back
// to p when it is read to its end and closed, and closes dc otherwise.
// On error dc is closed; no part of a response was passed on then, so
// that a request without a body may be sent again.
func (s *Server) roundTripData(ctx context.Context, w http.ResponseWriter, p *dataPool, dc *dataConn, out *http.Request) (*http.Response, error) {
	// The visitor leaving ends the exchange wherever it is; the
	// connection cannot be reused then.
	stop := context.AfterFunc(ctx, func() { _ = dc.raw.Conn.Close() })
	dc.br, dc.bw = s.dataBufs.reader(&dc.limit), s.dataBufs.writer(dc.conn)
	fail := func(err error) (*http.Response, error) {
		stop()
		s.dataBufs.release(dc, out.Body == nil)
		p.discard(dc)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}

	written := make(chan error, 1)
	if out.Body == nil {
		err := out.Write(dc.bw)
		if err == nil {
			err = dc.bw.Flush()
		}
		if err != nil {
			// The request is its header, which the member acts on only
			// once it has all of it.
			return fail(fmt.Errorf("%w: %w", errNotSent, err))
		}
		written <- nil
	} else {
		// The member may answer before it has read the whole body, and
		// the body may need the answer to end (a visitor waiting for it).
		bw := dc.bw
		go func() {
			err := out.Write(bw)
			if err == nil {
				err = bw.Flush()
			}
			if err != nil {
				_ = dc.conn.Close()
			}
			written <- err
		}()
	}

	var res *http.Response
	dc.limit.arm(int64(s.maxResponseHeaderBytes()))
	for n := 0; ; n++ {
		var err error
		res, err = http.ReadResponse(dc.br, out)
		if err != nil {
			return fail(err)
		}
		if res.StatusCode < 100 || res.StatusCode > 199 {
			break
		}
		if res.StatusCode == http.StatusSwitchingProtocols || n == max1xx {
			return fail(errBad1xx)
		}
		pass1xx(w, res.StatusCode, res.Header)
	}
	dc.limit.arm(-1)
	res.Body = &dataBody{body: res.Body, pool: p, bufs: &s.dataBufs, dc: dc, reuse: !res.Close, written: written, stop: stop}
	return res, nil
}

// dataBody is the body of a response read from a data connection.
type dataBody struct {
	body    io.ReadCloser
	pool    *dataPool
	bufs    *dataBufs
	dc      *dataConn
	reuse   bool // the member did not ask to close the connection
	eof     bool
	written chan error
	stop    func() bool
}

func (b *dataBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// buffered reports whether more of the body can be read without waiting
// for the network.
func (b *dataBody) buffered() bool {
	return b.dc.br.Buffered() > 0 || b.dc.raw.buf != nil
}

// Close gives the connection back when the exchange is complete on both
// sides, and closes it otherwise. A body not read to its end is not
// drained: it may be large, and nobody wants it.
func (b *dataBody) Close() error {
	stopped := b.stop()
	if !b.eof {
		_ = b.dc.conn.Close()
	}
	_ = b.body.Close()
	writerDone, reuse := false, b.eof && b.reuse && stopped
	select {
	case err := <-b.written:
		writerDone = true
		reuse = reuse && err == nil
	default:
		// The member answered while the body was still being sent.
		reuse = false
	}
	// Bytes nobody asked for would put the next exchange out of step,
	// whether bufio, TLS or the read batch under it holds them.
	reuse = reuse && b.dc.br.Buffered() == 0 && b.dc.raw.buf == nil && !b.dc.readAhead()
	b.bufs.release(b.dc, writerDone)
	if reuse {
		b.pool.put(b.dc)
	} else {
		b.pool.discard(b.dc)
	}
	return nil
}

// headerLimit bounds what a response's header may read from a data
// connection, as net/http's Transport does: a member cannot make the
// server buffer headers without end.
type headerLimit struct {
	r io.Reader
	n int64 // bytes left; negative when unlimited
}

// arm sets the bytes left to n; -1 lifts the limit.
func (l *headerLimit) arm(n int64) { l.n = n }

func (l *headerLimit) Read(p []byte) (int, error) {
	if l.n < 0 {
		return l.r.Read(p)
	}
	if l.n == 0 {
		return 0, errHeaderTooLarge
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

var errHeaderTooLarge = errors.New("member's response header too large")

// readBatcher sits under a data connection's tls.Conn and reads as much as
// the socket holds at once: TLS asks for one record of at most 16 KiB at a
// time, and on a bulk response each read would be a system call. The
// buffer is borrowed from pool only while it holds data, so that idle
// connections hold none; where the socket can be read directly, it is
// borrowed only once there is something to read, so that a connection
// waiting for its peer (a hello not yet sent, a member thinking, a stream
// between two events) holds none either. Reads and writes of the socket are
// raw system calls (see rawsock): each request crosses it twice.
type readBatcher struct {
	net.Conn
	rc   syscall.RawConn // nil where the socket cannot be read directly
	pool *sync.Pool      // of *[]byte of readBatchSize
	buf  *[]byte
	r, w int
}

// readBatchSize is the most read from a data connection at once.
const readBatchSize = 256 << 10

func newReadBatcher(c net.Conn, pool *sync.Pool) *readBatcher {
	b := &readBatcher{Conn: rawsock.Wrap(c), pool: pool}
	if sc, ok := c.(syscall.Conn); ok && canReadRaw {
		if rc, err := sc.SyscallConn(); err == nil {
			b.rc = rc
		}
	}
	return b
}

func (b *readBatcher) Read(p []byte) (int, error) {
	if b.buf == nil {
		if len(p) >= readBatchSize {
			return b.Conn.Read(p)
		}
		var n int
		var err error
		if b.rc != nil {
			n, err = b.readRaw()
		} else {
			b.borrow()
			n, err = b.Conn.Read(*b.buf)
		}
		b.r, b.w = 0, n
		if n <= 0 {
			if b.buf != nil {
				b.release()
			}
			return 0, err
		}
	}
	n := copy(p, (*b.buf)[b.r:b.w])
	b.r += n
	if b.r == b.w {
		b.release()
	}
	return n, nil
}

func (b *readBatcher) borrow() {
	if buf, ok := b.pool.Get().(*[]byte); ok {
		b.buf = buf
	} else {
		buf := make([]byte, readBatchSize)
		b.buf = &buf
	}
}

func (b *readBatcher) release() {
	b.pool.Put(b.buf)
	b.buf = nil
}
