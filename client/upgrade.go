package client

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/protocol"
)

// isUpgradeStream reports whether r is the tunnel server's extended CONNECT
// carrying a visitor's HTTP/1.1 upgrade (see the protocol package).
func isUpgradeStream(r *http.Request) bool {
	return r.Method == http.MethodConnect && r.Proto == protocol.UpgradeProtocol
}

// serveUpgrade accepts the upgrade stream and serves it as one HTTP/1.1
// connection with h, so that handlers that hijack (WebSocket libraries) work
// unchanged. It returns when that connection is closed.
func serveUpgrade(w http.ResponseWriter, h http.Handler, conn *quic.Conn, log *slog.Logger) {
	streamer, ok := w.(http3.HTTPStreamer)
	if !ok {
		http.Error(w, "upgrade not supported", http.StatusNotImplemented)
		return
	}
	w.WriteHeader(http.StatusOK)
	if err := http.NewResponseController(w).Flush(); err != nil {
		return
	}
	str, err := streamer.HTTPStream()
	if err != nil {
		log.Debug("upgrade stream unavailable", "error", err)
		return
	}
	c := &streamConn{Stream: str, local: conn.LocalAddr(), remote: conn.RemoteAddr(), tls: conn.ConnectionState().TLS, closed: make(chan struct{})}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	_ = srv.Serve(&oneConnListener{conn: c})
}

// streamConn is an HTTP/3 stream seen as a net.Conn.
type streamConn struct {
	*http3.Stream
	local, remote net.Addr
	tls           tls.ConnectionState
	once          sync.Once
	closed        chan struct{}
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.remote }

// ConnectionState makes net/http set r.TLS to the tunnel's TLS state, as
// http3 and the data connections do for every other request.
func (c *streamConn) ConnectionState() tls.ConnectionState { return c.tls }

func (c *streamConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	// Stop reading too: the peer may still be sending.
	c.Stream.CancelRead(0)
	return c.Stream.Close()
}

// oneConnListener hands out one connection, then blocks until that
// connection is closed, so that http.Server.Serve returns only when the
// upgraded connection is over.
type oneConnListener struct {
	mu   sync.Mutex
	conn *streamConn
	used bool
}

var errListenerDone = errors.New("upgrade connection closed")

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if !l.used {
		l.used = true
		l.mu.Unlock()
		return l.conn, nil
	}
	l.mu.Unlock()
	select {
	case <-l.conn.closed:
	case <-l.conn.Context().Done():
	}
	return nil, errListenerDone
}

func (l *oneConnListener) Close() error   { return nil }
func (l *oneConnListener) Addr() net.Addr { return l.conn.local }
