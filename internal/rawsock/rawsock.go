// Package rawsock reads and writes TCP sockets with raw system calls on
// Linux, outside the Go runtime's system call bookkeeping.
//
// Sockets in Go are non-blocking: a read or write returns at once, and the
// network poller waits for readiness. Yet each goes through the runtime's
// entersyscall, which, when the process had fallen idle, wakes the
// runtime's monitor thread (sysmon) with a futex. A proxy hop that sleeps
// between requests pays that wake on the critical path of each one: about
// 15 µs per process and request on a 2-core VM. A raw system call skips
// it; the P stays held for the few microseconds the call takes, as for
// any other non-blocking work. Deadlines and closing work as on the
// wrapped connection, through its syscall.RawConn.
//
// Elsewhere than Linux, Wrap and Listener leave connections as they are.
package rawsock

import "net"

// Wrap returns c reading and writing with raw system calls, when c is a
// *net.TCPConn on Linux; otherwise c itself. The result keeps every other
// method of *net.TCPConn (CloseWrite, ReadFrom, SetKeepAlive, ...), so
// that type assertions for them still hold.
func Wrap(c net.Conn) net.Conn { return wrap(c) }

// Listener is a net.Listener whose accepted connections are wrapped with
// Wrap.
type Listener struct {
	net.Listener
}

// Accept waits for the next connection and returns it wrapped.
func (l Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return Wrap(c), nil
}
