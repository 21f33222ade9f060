package client

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/reverst-dev/reverst/internal/testpki"
)

// largestWrite records the largest single write to its connection.
type largestWrite struct {
	net.Conn
	max int
}

func (l *largestWrite) Write(p []byte) (int, error) {
	l.max = max(l.max, len(p))
	return l.Conn.Write(p)
}

// A large response written in one call leaves in batches of a few TLS
// records, not gathered whole first, and the batch buffer the connection
// pools stays small.
func TestBatchedWritesStayBounded(t *testing.T) {
	var pool sync.Pool
	var rec *largestWrite
	conn, server := dataConnPair(t, &pool, func(c net.Conn) net.Conn {
		rec = &largestWrite{Conn: c}
		return rec
	})
	got := make(chan [sha256.Size]byte, 1)
	go func() {
		h := sha256.New()
		_, _ = io.Copy(h, server)
		got <- [sha256.Size]byte(h.Sum(nil))
	}()

	big := make([]byte, 8<<20)
	rand.Read(big)
	if _, err := conn.Write(big); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("tail")); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if <-got != sha256.Sum256(append(bytes.Clone(big), "tail"...)) {
		t.Fatal("the bytes arrived changed")
	}
	if rec.max > batchSize || rec.max <= 32<<10 {
		t.Errorf("largest write %d bytes, want more than two records and at most %d", rec.max, batchSize)
	}
	if b, ok := pool.Get().(*[]byte); ok && cap(*b) > 2*batchSize {
		t.Errorf("the pool holds a %d-byte batch buffer", cap(*b))
	}
}

// dataConnPair opens a data connection over loopback TLS as dial does,
// with pool for its write batches, and returns the member's end and the
// tunnel server's. wrap, when not nil, wraps the member's TCP connection.
func dataConnPair(t *testing.T, pool *sync.Pool, wrap func(net.Conn) net.Conn) (member *batchedTLS, server *tls.Conn) {
	t.Helper()
	pki := testpki.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		s := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{pki.Cert}})
		_ = s.Handshake()
		accepted <- s
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		raw = wrap(raw)
	}
	cc := &coalescingConn{Conn: raw, pool: pool}
	tc := tls.Client(cc, &tls.Config{RootCAs: pki.Pool, ServerName: "localhost"})
	if err := tc.Handshake(); err != nil { // as dial does, before batching
		raw.Close()
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("no data connection accepted")
	}
	member = &batchedTLS{Conn: tc, raw: cc}
	t.Cleanup(func() {
		server.Close()
		member.Close()
	})
	return member, server
}
