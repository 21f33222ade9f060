package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"

	"github.com/reverst-dev/reverst/protocol"
)

// Data channel tuning.
const (
	// dataAttempts is how many dials of a data channel may fail in a row
	// before the connection settles for QUIC alone: a server behind a
	// UDP-only load balancer, or TCP blocked on the way.
	dataAttempts = 3
	// dataDialTimeout bounds one dial, TLS handshake and hello included.
	dataDialTimeout = 5 * time.Second
	// dataFrameSize is the largest HTTP/2 frame the server may send us
	// (request bodies), as the server allows for responses.
	dataFrameSize = 1 << 20
)

// serveData keeps a data channel open next to the QUIC connection for as
// long as it lives, serving the same handler over HTTP/2 on it: the server
// sends its requests there while the channel is up, and over QUIC
// otherwise. A broken channel is dialled again; after dataAttempts failed
// dials in a row the connection stays on QUIC.
func (tc *tunnelConn) serveData(tlsConf *tls.Config, token string, pool *sync.Pool) {
	ctx := tc.conn.Context()
	addr := tc.conn.RemoteAddr().String()
	conf := tlsConf.Clone()
	conf.NextProtos = []string{protocol.DataChannelALPN}
	srv := &http2.Server{MaxReadFrameSize: dataFrameSize}

	for failures := 0; ctx.Err() == nil && !tc.isDraining(); {
		c, err := dialData(ctx, addr, conf, token, pool)
		if err != nil {
			failures++
			if ctx.Err() != nil {
				return
			}
			if failures == dataAttempts {
				tc.log.Info("data channel unavailable, serving over QUIC only", "error", err)
				return
			}
			tc.log.Debug("data channel failed, retrying", "error", err, "attempt", failures)
			timer := time.NewTimer(backoff(DefaultMinBackoff, DefaultMaxBackoff, failures))
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				return
			}
			continue
		}
		failures = 0
		if !tc.setData(c) {
			_ = c.Close()
			return
		}
		tc.log.Debug("data channel open")
		srv.ServeConn(c, &http2.ServeConnOpts{Context: ctx, Handler: tc})
		tc.setData(nil)
		_ = c.Close()
	}
}

// dialData opens a data channel to addr and presents token.
func dialData(ctx context.Context, addr string, conf *tls.Config, token string, pool *sync.Pool) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dataDialTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dialing data channel: %w", err)
	}
	cc := &coalescingConn{Conn: raw, pool: pool}
	tc := tls.Client(cc, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("dialing data channel: %w", err)
	}
	c := &batchedTLS{Conn: tc, raw: cc}
	if deadline, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(deadline)
	}
	if err := hello(c, token); err != nil {
		_ = c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

func hello(c net.Conn, token string) error {
	if err := protocol.WriteDataChannelHello(c, token); err != nil {
		return fmt.Errorf("data channel hello: %w", err)
	}
	var ok [1]byte
	if _, err := io.ReadFull(c, ok[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("data channel refused: the server does not know the token")
		}
		return fmt.Errorf("data channel hello: %w", err)
	}
	if ok[0] != protocol.DataChannelOK {
		return fmt.Errorf("data channel refused with %#x", ok[0])
	}
	return nil
}

// coalescingConn sits under a tls.Conn and turns the records of one
// tls.Conn.Write into one system call: TLS writes a record of at most
// 16 KiB at a time, and on a bulk response those writes cost more than the
// encryption. Writes outside a batch go straight through, in order.
type coalescingConn struct {
	net.Conn
	pool  *sync.Pool // of *[]byte, shared by a Server's connections
	mu    sync.Mutex // held while writing, so that order is kept
	batch bool
	buf   *[]byte // taken from pool for a batch
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.batch {
		if c.buf == nil {
			if b, ok := c.pool.Get().(*[]byte); ok {
				c.buf = b
			} else {
				b := make([]byte, 0, 64<<10)
				c.buf = &b
			}
		}
		*c.buf = append(*c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// flush ends a batch and writes what it gathered.
func (c *coalescingConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batch = false
	if c.buf == nil {
		return nil
	}
	_, err := c.Conn.Write(*c.buf)
	// Back to the pool, so that idle tunnels hold no buffer.
	*c.buf = (*c.buf)[:0]
	c.pool.Put(c.buf)
	c.buf = nil
	return err
}

func (c *coalescingConn) begin() {
	c.mu.Lock()
	c.batch = true
	c.mu.Unlock()
}

// batchedTLS is a data channel as the HTTP/2 server sees it: each of its
// writes (an HTTP/2 frame or a few) leaves in one system call.
type batchedTLS struct {
	*tls.Conn
	raw *coalescingConn
}

func (b *batchedTLS) Write(p []byte) (int, error) {
	b.raw.begin()
	n, err := b.Conn.Write(p)
	if ferr := b.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}
