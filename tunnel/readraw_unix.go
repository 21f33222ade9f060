//go:build unix

package tunnel

import (
	"io"
	"net"
	"os"
	"syscall"
)

const canReadRaw = true

// readRaw reads what the socket holds into a borrowed batch, borrowed only
// for a read that does not have to wait. Deadlines apply as on the conn.
func (b *readBatcher) readRaw() (int, error) {
	var n int
	var rerr error
	err := b.rc.Read(func(fd uintptr) bool {
		b.borrow()
		n, rerr = syscall.Read(int(fd), *b.buf)
		if rerr == syscall.EAGAIN || rerr == syscall.EWOULDBLOCK || rerr == syscall.EINTR {
			b.release()
			return false // wait until readable, then call again
		}
		return true
	})
	switch {
	case err != nil: // a deadline passed, or the conn was closed
		return 0, err
	case rerr != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: b.LocalAddr(), Addr: b.RemoteAddr(), Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
