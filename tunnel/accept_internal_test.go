package tunnel

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/protocol"
)

// fdStarvedListener fails its first accepts as a process out of file
// descriptors does, then accepts for real.
type fdStarvedListener struct {
	net.Listener
	failures atomic.Int32
}

func (l *fdStarvedListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

func TestServeDataOutlivesFileDescriptorExhaustion(t *testing.T) {
	// Running out of file descriptors (a flood of connections) must not
	// end the data listener, which would stop the whole server.
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &fdStarvedListener{Listener: tcp}
	ln.failures.Store(3)
	pki := testpki.New(t)
	s := &Server{}
	served := make(chan error, 1)
	go func() { served <- s.ServeData(ln, &tls.Config{Certificates: []tls.Certificate{pki.Cert}}) }()

	// A TLS handshake with the data ALPN completes: the connection was
	// accepted and served after the failures.
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", tcp.Addr().String(), &tls.Config{RootCAs: pki.Pool, ServerName: "localhost", NextProtos: []string{protocol.DataALPN}})
	select {
	case err := <-served:
		t.Fatalf("ServeData returned %v after EMFILE", err)
	default:
	}
	if err != nil {
		t.Fatalf("data connection after EMFILE: %v", err)
	}
	conn.Close()
	if n := ln.failures.Load(); n >= 0 {
		t.Fatalf("accept failures left to serve: %d", n+1)
	}

	_ = s.Close()
	_ = tcp.Close()
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeData after Close: %v, want ErrServerClosed", err)
	}
}
