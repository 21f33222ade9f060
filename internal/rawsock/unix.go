//go:build unix && !linux

package rawsock

import (
	"net"
	"syscall"
)

func wrap(c net.Conn) net.Conn { return c }

// Read makes one read(2) of fd into p (retried on EINTR), through the
// runtime here.
func Read(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, err := syscall.Read(int(fd), p)
		if err != syscall.EINTR {
			return n, errno(err)
		}
	}
}

// Write makes one write(2) of p to fd, through the runtime here.
func Write(fd uintptr, p []byte) (int, syscall.Errno) {
	for {
		n, err := syscall.Write(int(fd), p)
		if err != syscall.EINTR {
			return n, errno(err)
		}
	}
}

// Recv makes one recvfrom(2) of fd into p with flags, through the runtime
// here.
func Recv(fd uintptr, p []byte, flags int) (int, syscall.Errno) {
	for {
		n, _, err := syscall.Recvfrom(int(fd), p, flags)
		if err != syscall.EINTR {
			return n, errno(err)
		}
	}
}

func errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if e, ok := err.(syscall.Errno); ok {
		return e
	}
	return syscall.EIO
}
