package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/reverst-dev/reverst/internal/rawsock"
	"github.com/reverst-dev/reverst/protocol"
)

// Data connections (see package protocol): TCP connections beside the
// QUIC one, on which the tunnel server sends plain requests over
// HTTP/1.1, one at a time (see dataserve.go for how they are served).

// Data connection tuning.
const (
	// dataSpare is how many idle data connections are kept ready: the
	// server sends a request over QUIC when none is idle, so a burst
	// opens more as the spares get busy.
	dataSpare = 2
	// dataMax bounds the data connections of one tunnel connection.
	dataMax = 128
	// dataAttempts is how many dials may fail in a row before the
	// connection rests on QUIC for dataRest: a server behind a UDP-only
	// load balancer, or TCP blocked on the way.
	dataAttempts = 3
	dataRest     = 30 * time.Second
	// dataDialTimeout bounds one dial, TLS handshake and hello included.
	dataDialTimeout = 5 * time.Second
)

// dataConns keeps the data connections of one tunnel connection: it dials
// them, serves the tunnel's handler on them, and follows their states to
// keep dataSpare of them idle.
type dataConns struct {
	tc      *tunnelConn
	addr    string // the address the QUIC connection reached
	conf    *tls.Config
	token   string
	pool    *sync.Pool // write batches, shared by a Server's connections
	writers responseWriters
	kick    chan struct{}

	mu     sync.Mutex
	idle   int // idle or not yet used
	open   int
	short  int // requests that came over QUIC, each owed a connection
	wasted int // connections in a row closed unused right after their dial
	state  map[*batchedTLS]http.ConnState
	closed bool
}

func newDataConns(tc *tunnelConn, tlsConf *tls.Config, token string, pool *sync.Pool) *dataConns {
	conf := tlsConf.Clone()
	conf.NextProtos = []string{protocol.DataALPN}
	return &dataConns{
		tc:    tc,
		addr:  tc.conn.RemoteAddr().String(),
		conf:  conf,
		token: token,
		pool:  pool,
		kick:  make(chan struct{}, 1),
		state: map[*batchedTLS]http.ConnState{},
	}
}

// run dials until the QUIC connection ends. No connection has an idle
// timeout: the tunnel server closes those it does not need, and an idle
// one here is a spare.
func (d *dataConns) run() {
	defer d.close()
	d.wake()
	ctx := d.tc.conn.Context()
	failures := 0
	for {
		select {
		case <-d.kick:
		case <-ctx.Done():
			return
		}
		for d.needed() {
			d.mu.Lock()
			wasted := d.wasted
			d.mu.Unlock()
			if wasted > 0 && !sleep(ctx, backoff(DefaultMinBackoff, DefaultMaxBackoff, wasted-1)) {
				return
			}
			c, err := d.dial(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				failures++
				wait := backoff(DefaultMinBackoff, DefaultMaxBackoff, failures)
				if failures%dataAttempts == 0 {
					d.tc.log.Info("data connections unavailable, serving over QUIC only for a while", "error", err, "retry_in", dataRest)
					wait = dataRest
				}
				if !sleep(ctx, wait) {
					return
				}
				continue
			}
			failures = 0
			d.mu.Lock()
			if d.closed {
				d.mu.Unlock()
				_ = c.Close()
				return
			}
			if d.idle >= dataSpare {
				// Not a spare: it answers an overflowed request.
				d.short = max(d.short-1, 0)
			}
			d.idle++
			d.open++
			d.state[c] = http.StateNew
			d.mu.Unlock()
			go d.serveConn(c)
		}
	}
}

// serveHTTP refuses upgrades on a data connection: they travel over QUIC
// (see package protocol), and a data connection is not handed over.
func (d *dataConns) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect || r.Header.Get("Upgrade") != "" {
		http.Error(w, "upgrade on a data connection", http.StatusBadRequest)
		return
	}
	d.tc.ServeHTTP(w, r)
}

// needed reports whether another connection should be dialled.
func (d *dataConns) needed() bool {
	if d.tc.isDraining() {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return (d.idle < dataSpare || d.short > 0) && d.open < dataMax
}

// overflowed records a plain request that came over QUIC: the tunnel
// server found no idle data connection for it. The spares follow the
// member's own view of its connections, in which a connection is idle
// from its response until the next request arrives, while the server's
// bursts come from visitors the member does not see; so each such
// request asks for one more connection, up to dataMax. Connections the
// server finds it does not need, it closes after a while.
func (d *dataConns) overflowed() {
	d.mu.Lock()
	d.short = min(d.short+1, dataMax)
	d.mu.Unlock()
	d.wake()
}

func (d *dataConns) wake() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// track follows the state of c, a connection being served.
func (d *dataConns) track(c *batchedTLS, st http.ConnState) {
	d.mu.Lock()
	prev, known := d.state[c]
	wasIdle := known && (prev == http.StateNew || prev == http.StateIdle)
	switch st {
	case http.StateIdle:
		if !wasIdle {
			d.idle++
		}
		d.state[c] = st
	case http.StateActive:
		if wasIdle {
			d.idle--
		}
		d.state[c] = st
		d.wasted = 0
	case http.StateHijacked:
		// Still open: it counts against dataMax until closed.
		if wasIdle {
			d.idle--
		}
		if known {
			d.state[c] = st
		}
	case http.StateClosed:
		if wasIdle {
			d.idle--
		}
		if known {
			if prev == http.StateNew && time.Since(c.born) < DefaultMaxBackoff {
				d.wasted++ // closed unused right after the dial
			}
			delete(d.state, c)
			d.open--
		}
	}
	short := d.idle < dataSpare
	d.mu.Unlock()
	if short {
		d.wake()
	}
}

// closedHijacked forgets a hijacked connection once closed.
func (d *dataConns) closedHijacked(c *batchedTLS) {
	d.mu.Lock()
	st, known := d.state[c]
	if known && st == http.StateHijacked {
		delete(d.state, c)
		d.open--
	}
	d.mu.Unlock()
	d.wake()
}

// close closes every data connection at once, and those dialled later.
func (d *dataConns) close() {
	d.mu.Lock()
	d.closed = true
	conns := slices.Collect(maps.Keys(d.state))
	d.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

// dial opens a data connection and presents the token.
func (d *dataConns) dial(ctx context.Context) (*batchedTLS, error) {
	ctx, cancel := context.WithTimeout(ctx, dataDialTimeout)
	defer cancel()
	var dialer net.Dialer
	raw, err := dialer.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, fmt.Errorf("dialing data connection: %w", err)
	}
	// Raw system calls: each request crosses the connection twice, and
	// the runtime's own would wake its monitor thread each time the member
	// had fallen idle (see rawsock).
	cc := &coalescingConn{Conn: rawsock.Wrap(raw), pool: d.pool}
	tc := tls.Client(cc, d.conf)
	if deadline, ok := ctx.Deadline(); ok {
		_ = tc.SetDeadline(deadline)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("dialing data connection: %w", err)
	}
	if err := hello(tc, d.token); err != nil {
		_ = raw.Close()
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	return &batchedTLS{Conn: tc, raw: cc, born: time.Now(), onClose: d.closedHijacked}, nil
}

func hello(c net.Conn, token string) error {
	if err := protocol.WriteDataHello(c, token); err != nil {
		return fmt.Errorf("data connection hello: %w", err)
	}
	var ok [1]byte
	if _, err := io.ReadFull(c, ok[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("data connection refused")
		}
		return fmt.Errorf("data connection hello: %w", err)
	}
	if ok[0] != protocol.DataOK {
		return fmt.Errorf("data connection refused with %#x", ok[0])
	}
	return nil
}

// coalescingConn sits under a tls.Conn and turns the records of one
// tls.Conn.Write into few system calls: TLS writes a record of at most
// 16 KiB at a time, and on a bulk response those writes cost more than the
// encryption. A batch leaves whenever it fills batchSize, so that a large
// write is neither held whole in memory nor sent only once all of it is
// encrypted. Writes outside a batch go straight through, in order.
type coalescingConn struct {
	net.Conn
	pool  *sync.Pool // of *[]byte
	mu    sync.Mutex // held while writing, so that order is kept
	batch bool
	buf   *[]byte // taken from pool for a batch
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.batch {
		return c.Conn.Write(p)
	}
	if c.buf == nil {
		if b, ok := c.pool.Get().(*[]byte); ok {
			c.buf = b
		} else {
			b := make([]byte, 0, 64<<10) // grown by bulk writes
			c.buf = &b
		}
	}
	if len(*c.buf) > 0 && len(*c.buf)+len(p) > batchSize {
		if _, err := c.Conn.Write(*c.buf); err != nil {
			return 0, err
		}
		*c.buf = (*c.buf)[:0]
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// batchSize is the most a write batch holds before it is sent: sixteen
// TLS records, one system call per 256 KiB of a bulk response, as the
// server reads them.
const batchSize = 256 << 10

func (c *coalescingConn) begin() {
	c.mu.Lock()
	c.batch = true
	c.mu.Unlock()
}

// flush ends a batch and writes what it gathered.
func (c *coalescingConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batch = false
	if c.buf == nil {
		return nil
	}
	var err error
	if len(*c.buf) > 0 {
		_, err = c.Conn.Write(*c.buf)
	}
	// Back to the pool, so that idle tunnels hold no buffer; one that a
	// single write larger than a batch grew is left to the collector.
	if cap(*c.buf) <= 2*batchSize {
		*c.buf = (*c.buf)[:0]
		c.pool.Put(c.buf)
	}
	c.buf = nil
	return err
}

// batchedTLS is a data connection as its server sees it: each of its
// writes leaves in one system call.
type batchedTLS struct {
	*tls.Conn
	raw     *coalescingConn
	born    time.Time
	once    sync.Once
	onClose func(*batchedTLS)
}

// Close lets a hijacked connection leave the count when its handler is
// done with it.
func (b *batchedTLS) Close() error {
	err := b.Conn.Close()
	if b.onClose != nil {
		b.once.Do(func() { b.onClose(b) })
	}
	return err
}

func (b *batchedTLS) Write(p []byte) (int, error) {
	b.raw.begin()
	n, err := b.Conn.Write(p)
	if ferr := b.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}
