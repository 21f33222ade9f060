package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"

	"github.com/reverst-dev/reverst/protocol"
)

// ServeData accepts data channels (see package protocol) from ln, a TCP
// listener, until ln fails or the server is shut down: it runs TLS with
// config, whose NextProtos is replaced by protocol.DataChannelALPN, and
// attaches each channel to the member whose token it presents. Until
// ServeData is called, registrations are not offered a data channel and
// every request travels over QUIC.
//
// It always returns a non-nil error; after Shutdown or Close, or once ln
// is closed, it is ErrServerClosed. The caller keeps ownership of ln and
// closes it; data channels already attached end with their members.
func (s *Server) ServeData(ln net.Listener, config *tls.Config) error {
	config = config.Clone()
	config.NextProtos = []string{protocol.DataChannelALPN}
	s.dataOn.Store(true)
	defer s.dataOn.Store(false)
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Out of file descriptors and the like: let it pass.
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("tunnel: accepting data channels: %w", err)
		}
		go s.handleData(tls.Server(&readBatcher{Conn: c, pool: &s.readBufs}, config))
	}
}

// handleData runs the data channel hello on c and attaches it.
func (s *Server) handleData(c net.Conn) {
	log := s.logger().With("remote", c.RemoteAddr().String())
	m, err := s.dataHello(c)
	if err != nil {
		s.Metrics.dataChannel("refused")
		log.Debug("data channel refused", "error", err)
		_ = c.Close()
		return
	}
	cc, err := s.h2Transport().NewClientConn(c)
	if err != nil {
		s.Metrics.dataChannel("refused")
		log.Debug("data channel refused", "error", err)
		_ = c.Close()
		return
	}
	if old := m.data.Swap(cc); old != nil {
		// The client replaced a channel it found broken; requests still
		// on the old one finish or fail on their own.
		_ = old.Close()
	}
	if m.conn.Context().Err() != nil && m.data.CompareAndSwap(cc, nil) {
		// The member left meanwhile, after its cleanup looked.
		_ = cc.Close()
		return
	}
	s.Metrics.dataChannel("ok")
	log.Debug("data channel attached")
}

// dataHello checks that c is a data channel of a live member, and
// accepts it.
func (s *Server) dataHello(c net.Conn) (*member, error) {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return nil, errors.New("not a TLS connection")
	}
	timeout := s.RegisterTimeout
	if timeout <= 0 {
		timeout = DefaultRegisterTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	_ = tc.SetDeadline(deadline)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != protocol.DataChannelALPN {
		return nil, fmt.Errorf("application protocol %q", p)
	}
	token, err := protocol.ReadDataChannelHello(tc)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	m := s.tokens[token]
	s.mu.Unlock()
	if m == nil {
		return nil, errors.New("unknown token")
	}
	if _, err := tc.Write([]byte{protocol.DataChannelOK}); err != nil {
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	return m, nil
}

// offerData returns the token that lets m open a data channel, or "" when
// the member did not ask for one or the server serves none.
func (s *Server) offerData(m *member, want string) string {
	if want != protocol.DataChannelH2 || !s.dataOn.Load() {
		return ""
	}
	token := protocol.NewDataChannelToken()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tokens == nil {
		s.tokens = map[string]*member{}
	}
	s.tokens[token] = m
	m.token = token
	return token
}

// dropData forgets m's token and closes its data channel; m has left.
func (s *Server) dropData(m *member) {
	if m.token != "" {
		s.mu.Lock()
		delete(s.tokens, m.token)
		s.mu.Unlock()
	}
	if cc := m.data.Swap(nil); cc != nil {
		_ = cc.Close()
	}
}

// dataConn returns m's data channel when it can take a request.
func (m *member) dataConn() *http2.ClientConn {
	cc := m.data.Load()
	if cc == nil || !cc.CanTakeNewRequest() {
		return nil
	}
	return cc
}

// readBatcher sits under a data channel's tls.Conn and reads as much as
// the socket holds at once: TLS asks for one record of at most 16 KiB at a
// time, and on a bulk response each read would be a system call. The
// buffer is borrowed from pool only while it holds data, so that idle
// channels hold none.
type readBatcher struct {
	net.Conn
	pool *sync.Pool // of *[]byte of readBatchSize
	buf  *[]byte
	r, w int
}

// readBatchSize is the most read from a data channel at once.
const readBatchSize = 256 << 10

func (b *readBatcher) Read(p []byte) (int, error) {
	if b.buf == nil {
		if len(p) >= readBatchSize {
			return b.Conn.Read(p)
		}
		if buf, ok := b.pool.Get().(*[]byte); ok {
			b.buf = buf
		} else {
			buf := make([]byte, readBatchSize)
			b.buf = &buf
		}
		n, err := b.Conn.Read(*b.buf)
		b.r, b.w = 0, n
		if n == 0 {
			b.release()
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

func (b *readBatcher) release() {
	b.pool.Put(b.buf)
	b.buf = nil
}

func (s *Server) h2Transport() *http2.Transport {
	s.proxyOnce.Do(s.initProxy)
	return s.h2
}

// dataFrameSize is the largest HTTP/2 frame a member may send: large
// enough that a bulk response costs few frames, small enough that the
// frame buffer each channel keeps stays modest.
const dataFrameSize = 1 << 20

// dataPingAfter is how long a data channel may stay silent before it is
// pinged: a TCP connection that a middlebox dropped is then closed, and
// the member's requests go over QUIC.
const dataPingAfter = 15 * time.Second
