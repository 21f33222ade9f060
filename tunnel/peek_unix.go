//go:build unix

package tunnel

import (
	"syscall"

	"github.com/reverst-dev/reverst/internal/rawsock"
)

// peekClosed reports whether the socket fd has reached end of file, failed,
// or holds data, without consuming any of it or waiting.
func peekClosed(fd uintptr) bool {
	var b [1]byte
	_, errno := rawsock.Recv(fd, b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	// Nothing to read is the one answer of an open, idle connection; any
	// other (end of file, a byte, an error) unfits it for a request.
	return errno != syscall.EAGAIN
}
