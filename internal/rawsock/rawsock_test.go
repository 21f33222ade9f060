package rawsock

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// pair returns a connected loopback TCP pair: c, wrapped when wrapped, and
// its plain peer.
func pair(t *testing.T, wrapped bool) (c, peer net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if wrapped {
		ln = Listener{Listener: ln}
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	peer, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c = <-accepted
	if c == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() {
		c.Close()
		peer.Close()
	})
	return c, peer
}

// Each case runs on a plain *net.TCPConn and on a wrapped one, and their
// outcomes must be the same: a wrapped connection is a drop-in.
func TestWrappedBehavesAsTCPConn(t *testing.T) {
	type outcome struct {
		n       int
		op      string // of a *net.OpError
		eof     bool
		timeout bool
		closed  bool
		broken  bool // EPIPE or ECONNRESET
	}
	describe := func(n int, err error) outcome {
		o := outcome{n: n, eof: err == io.EOF}
		var oe *net.OpError
		if errors.As(err, &oe) {
			o.op = oe.Op
		}
		var ne net.Error
		o.timeout = errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
		o.closed = errors.Is(err, net.ErrClosed)
		o.broken = errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
		return o
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, c, peer net.Conn) (int, error)
	}{
		{"read what was sent", func(t *testing.T, c, peer net.Conn) (int, error) {
			peer.Write([]byte("hello"))
			buf := make([]byte, 5)
			return io.ReadFull(c, buf)
		}},
		{"empty read", func(t *testing.T, c, peer net.Conn) (int, error) {
			return c.Read(nil)
		}},
		{"end of file", func(t *testing.T, c, peer net.Conn) (int, error) {
			peer.Close()
			return c.Read(make([]byte, 8))
		}},
		{"read deadline", func(t *testing.T, c, peer net.Conn) (int, error) {
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			return c.Read(make([]byte, 8))
		}},
		{"deadline lifted", func(t *testing.T, c, peer net.Conn) (int, error) {
			c.SetReadDeadline(time.Now().Add(-time.Second))
			c.SetReadDeadline(time.Time{})
			go func() {
				time.Sleep(20 * time.Millisecond)
				peer.Write([]byte("x"))
			}()
			return c.Read(make([]byte, 8))
		}},
		{"read after close", func(t *testing.T, c, peer net.Conn) (int, error) {
			c.Close()
			return c.Read(make([]byte, 8))
		}},
		{"close while reading", func(t *testing.T, c, peer net.Conn) (int, error) {
			time.AfterFunc(20*time.Millisecond, func() { c.Close() })
			return c.Read(make([]byte, 8))
		}},
		{"write deadline on a full socket", func(t *testing.T, c, peer net.Conn) (int, error) {
			c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
			n, err := c.Write(make([]byte, 64<<20)) // more than the socket buffers hold
			if n <= 0 || n >= 64<<20 {
				t.Errorf("wrote %d bytes of a stalled 64 MiB write", n)
			}
			return 0, err
		}},
		{"write to a reset peer", func(t *testing.T, c, peer net.Conn) (int, error) {
			peer.(*net.TCPConn).SetLinger(0)
			peer.Close()
			time.Sleep(20 * time.Millisecond)
			var err error
			for range 100 {
				if _, err = c.Write([]byte("x")); err != nil {
					break
				}
			}
			return 0, err
		}},
		{"close write", func(t *testing.T, c, peer net.Conn) (int, error) {
			cw, ok := c.(interface{ CloseWrite() error })
			if !ok {
				t.Fatal("no CloseWrite")
			}
			cw.CloseWrite()
			return peer.Read(make([]byte, 8))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got [2]outcome
			for i, wrapped := range []bool{false, true} {
				c, peer := pair(t, wrapped)
				// Not *Conn, which only Linux builds have.
				if _, plain := c.(*net.TCPConn); plain == (wrapped && runtime.GOOS == "linux") {
					t.Fatalf("wrapped %v: got a %T", wrapped, c)
				}
				got[i] = describe(tc.run(t, c, peer))
			}
			if got[0] != got[1] {
				t.Errorf("*net.TCPConn: %+v\nwrapped:      %+v", got[0], got[1])
			}
			t.Logf("%+v", got[1])
		})
	}
}

// Large transfers each way arrive whole and in order through writes and
// reads that wait for the socket.
func TestWrappedBulk(t *testing.T) {
	c, peer := pair(t, true)
	data := make([]byte, 16<<20)
	rand.Read(data)
	for _, dir := range []struct {
		name string
		w, r net.Conn
	}{{"wrapped writes", c, peer}, {"wrapped reads", peer, c}} {
		t.Run(dir.name, func(t *testing.T) {
			errs := make(chan error, 1)
			go func() {
				n, err := dir.w.Write(data)
				if err == nil && n != len(data) {
					err = io.ErrShortWrite
				}
				errs <- err
			}()
			got := make([]byte, len(data))
			if _, err := io.ReadFull(dir.r, got); err != nil {
				t.Fatal(err)
			}
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("the data arrived changed")
			}
		})
	}
}

// Only TCP connections are wrapped.
func TestWrapLeavesOtherConns(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Fatal("a pipe was wrapped")
	}
}

// Writes from several goroutines arrive each in one piece, as on a
// *net.TCPConn, whose Write holds the socket's write lock to the end: even
// when the socket fills and each leaves in parts.
func TestWrappedConcurrentWritesStayWhole(t *testing.T) {
	for _, wrapped := range []bool{false, true} {
		c, peer := pair(t, wrapped)
		// A small send buffer: each write leaves in many parts.
		c.(interface{ SetWriteBuffer(int) error }).SetWriteBuffer(128 << 10)
		const rounds, writers, size = 60, 4, 256 << 10
		got := make([]byte, writers*size)
		split := 0
		for range rounds {
			errs := make(chan error, writers)
			for i := range writers {
				go func() {
					_, err := c.Write(bytes.Repeat([]byte{'a' + byte(i)}, size))
					errs <- err
				}()
			}
			if _, err := io.ReadFull(peer, got); err != nil {
				t.Fatal(err)
			}
			for range writers {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			for i := range writers {
				// Each write's bytes are size of one value: whole when
				// they span no more.
				b := 'a' + byte(i)
				if bytes.LastIndexByte(got, b)-bytes.IndexByte(got, b) != size-1 {
					split++
					break
				}
			}
		}
		if split > 0 {
			t.Errorf("wrapped %v: %d writes at once arrived in pieces in %d rounds of %d", wrapped, writers, split, rounds)
		}
	}
}

// Empty reads and writes of a closed connection fail, as on a
// *net.TCPConn.
func TestWrappedEmptyAfterClose(t *testing.T) {
	for _, wrapped := range []bool{false, true} {
		c, _ := pair(t, wrapped)
		c.Close()
		if _, err := c.Read(nil); !errors.Is(err, net.ErrClosed) {
			t.Errorf("wrapped %v: Read(nil) after Close: %v", wrapped, err)
		}
		if _, err := c.Write(nil); !errors.Is(err, net.ErrClosed) {
			t.Errorf("wrapped %v: Write(nil) after Close: %v", wrapped, err)
		}
	}
}
