//go:build linux

package rawsock

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// maxRW bounds one system call, as internal/poll does.
const maxRW = 1 << 30

// Read makes one read(2) of fd into p, retried on EINTR.
func Read(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(min(len(p), maxRW)))
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// Write makes one write(2) of p to fd, retried on EINTR.
func Write(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(min(len(p), maxRW)))
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// Recv makes one recvfrom(2) of fd into p with flags, retried on EINTR;
// the source address is not asked for.
func Recv(fd uintptr, p []byte, flags int) (int, syscall.Errno) {
	for {
		n, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)), uintptr(flags), 0, 0)
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// Conn is a *net.TCPConn whose Read and Write make raw system calls.
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn
}

func wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	return &Conn{TCPConn: tc, rc: rc}
}

// Read reads as (*net.TCPConn).Read does, with the same errors.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		// As net's: no wait, nor deadline, but a closed connection
		// fails.
		if err := c.rc.Control(func(uintptr) {}); err != nil {
			return 0, c.opError("read", err)
		}
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		n, errno = Read(fd, p)
		return errno != syscall.EAGAIN // else wait until readable
	})
	switch {
	case err != nil: // a deadline passed, or the connection was closed
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of p as (*net.TCPConn).Write does, with the same
// errors. It holds the socket's write lock to the end, across the waits
// for a full socket, as net does: writes from several goroutines do not
// interleave.
func (c *Conn) Write(p []byte) (int, error) {
	var n int
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		for {
			m, errno := Write(fd, p[n:])
			switch {
			case errno == syscall.EAGAIN:
				return false // wait until writable
			case errno != 0:
				werr = os.NewSyscallError("write", errno)
				return true
			}
			n += m
			if n == len(p) {
				return true
			}
			if m == 0 {
				werr = io.ErrUnexpectedEOF // as internal/poll, rather than spin
				return true
			}
		}
	})
	if err == nil {
		err = werr
	}
	if err != nil {
		return n, c.opError("write", err)
	}
	return n, nil
}

// opError reports err as net reports its own, under the operation's name
// (net/http, for one, keeps quiet about a failed "read") rather than
// syscall.RawConn's "raw-read".
func (c *Conn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
