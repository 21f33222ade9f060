//go:build unix

package tunnel

import (
	"io"
	"net"
	"os"
	"syscall"

	"github.com/reverst-dev/reverst/internal/rawsock"
)

const canReadRaw = true

// readRaw reads what the socket holds into a borrowed batch, borrowed only
// for a read that does not have to wait. Deadlines apply as on the conn.
func (b *readBatcher) readRaw() (int, error) {
	var n int
	var errno syscall.Errno
	err := b.rc.Read(func(fd uintptr) bool {
		b.borrow()
		n, errno = rawsock.Read(fd, *b.buf)
		if errno == syscall.EAGAIN {
			b.release()
			return false // wait until readable, then call again
		}
		return true
	})
	switch {
	case err != nil: // a deadline passed, or the conn was closed
		return 0, err
	case errno != 0:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: b.LocalAddr(), Addr: b.RemoteAddr(), Err: os.NewSyscallError("read", errno)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
