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
	pki := testpki.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan [sha256.Size]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		_, _ = io.Copy(h, tls.Server(c, &tls.Config{Certificates: []tls.Certificate{pki.Cert}}))
		got <- [sha256.Size]byte(h.Sum(nil))
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rec := &largestWrite{Conn: raw}
	var pool sync.Pool
	cc := &coalescingConn{Conn: rec, pool: &pool}
	tc := tls.Client(cc, &tls.Config{RootCAs: pki.Pool, ServerName: "localhost"})
	if err := tc.Handshake(); err != nil { // as dial does, before batching
		t.Fatal(err)
	}
	conn := &batchedTLS{Conn: tc, raw: cc}

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
