// Package tunnel is the reverst tunnel server: it accepts tunnel
// registrations over QUIC, keeps the members of each tunnel group, routes
// HTTP requests by Host to a group and proxies them to one of its members
// over HTTP/3.
//
// A [Server] has three entry points, each run by the caller: [Server.Serve]
// takes registrations from a QUIC listener, [Server.ServeHTTP] is the HTTP
// frontend, and [Server.SetGroups] applies a (new) set of group definitions.
// The routing table is an immutable value swapped atomically, so requests
// never wait for a registration or a reload.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
)

// DefaultMaxResponseHeaderBytes bounds a member's response headers when
// Server.MaxResponseHeaderBytes is zero, as net/http's Transport does.
const DefaultMaxResponseHeaderBytes = 10 << 20

// DefaultSendTimeout is Server.SendTimeout when zero.
const DefaultSendTimeout = time.Minute

// DefaultReceiveTimeout is Server.ReceiveTimeout when zero.
const DefaultReceiveTimeout = time.Minute

// DefaultRegisterTimeout bounds the wait for a client's register request.
const DefaultRegisterTimeout = 5 * time.Second

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("tunnel: server closed")

// Server is a tunnel server. The zero value is ready to use: it has no
// groups (every registration is "not found", every request 502) until
// SetGroups is called.
type Server struct {
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// RegisterTimeout bounds the time between the QUIC handshake and a
	// complete register request; zero means DefaultRegisterTimeout.
	RegisterTimeout time.Duration
	// Metrics, when set, is updated by the server. See NewMetrics.
	Metrics *Metrics
	// TrustForwardedHeaders routes by the visitor's X-Forwarded-Host when
	// present, and extends (rather than replaces) its X-Forwarded-For and
	// X-Forwarded-Proto. Turn it on only behind a proxy that sets them.
	TrustForwardedHeaders bool
	// MaxRequestsPerMember caps the requests in flight on one member; zero
	// means no cap. A request finding every member full waits up to
	// QueueTimeout (DefaultQueueTimeout when zero), then is answered 503.
	MaxRequestsPerMember int
	QueueTimeout         time.Duration
	// RegistrationRate limits registrations per second from one IP
	// address, with bursts of RegistrationBurst; zero means no limit.
	// Excess connections are closed with the server-error code, so
	// clients back off and retry.
	RegistrationRate  float64
	RegistrationBurst int
	// DataConnections offers data connections (see package protocol) to
	// the members that ask for them, which the caller then serves with
	// ServeData on the TCP port of the tunnel address (see Listen). Without
	// it every request travels over QUIC.
	DataConnections bool
	// MaxResponseHeaderBytes limits a member's response headers; zero means
	// DefaultMaxResponseHeaderBytes.
	MaxResponseHeaderBytes int
	// SendTimeout is the longest a write of a response to a visitor may
	// wait, as nginx's send_timeout; zero means DefaultSendTimeout. A
	// visitor that stops reading would otherwise hold its member's request
	// slot and data connection for good.
	SendTimeout time.Duration
	// ReceiveTimeout is the longest a read of a visitor's request body may
	// wait, as nginx's client_body_timeout; zero means
	// DefaultReceiveTimeout.
	ReceiveTimeout time.Duration

	table atomic.Pointer[table]

	mu       sync.Mutex // guards the fields below and serialises SetGroups
	conns    map[*quic.Conn]struct{}
	tokens   map[string]*member // data connection tokens of live members
	closed   bool
	inflight sync.WaitGroup // registrations being handled

	limiterOnce sync.Once
	limiter     *registrationLimiter

	proxyOnce   sync.Once
	h3          *http3.Transport
	buffers     *bufferPool
	bulkBuffers *bufferPool

	readBufs sync.Pool // of data connection read batches
	dataBufs dataBufs
	pending  pendingData // data connections in their hello
}

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return discardLogger
	}
	return s.Logger
}

// discardLogger is the Logger of a Server without one. The frontend asks
// for it on every request; a Logger is never modified, only derived from.
var discardLogger = slog.New(slog.DiscardHandler)

// SetGroups replaces the routing table with defs. Groups whose name stays
// keep their members and in-flight requests; their hosts and authenticator
// take effect at once (the new authenticator for new registrations only).
// Removed groups stop routing and their members are disconnected. defs must
// be valid (see groups.Config.Validate); SetGroups returns an error and
// changes nothing when two groups share a name or a host.
func (s *Server) SetGroups(defs []Group) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.table.Load()
	next := &table{byName: make(map[string]*group, len(defs)), byHost: map[string]*group{}, bySuffix: map[string]*group{}}
	for _, d := range defs {
		if _, dup := next.byName[d.Name]; dup {
			return fmt.Errorf("tunnel: group %q defined twice", d.Name)
		}
		g := old.lookupName(d.Name)
		if g == nil {
			g = s.newGroup(d.Name)
		}
		next.byName[d.Name] = g
		for _, h := range d.Hosts {
			h = groups.NormalizeHost(h)
			m := next.byHost
			key := h
			if suffix, ok := groups.Wildcard(h); ok {
				m, key = next.bySuffix, suffix
			}
			if other, dup := m[key]; dup {
				return fmt.Errorf("tunnel: host %q in groups %q and %q", h, other.name, d.Name)
			}
			m[key] = g
		}
	}
	for _, d := range defs {
		g := next.byName[d.Name]
		g.auth.Store(&authBox{d.Auth})
		hosts := slices.Clone(d.Hosts)
		g.hosts.Store(&hosts)
	}
	s.table.Store(next)

	if old != nil {
		for name, g := range old.byName {
			if _, kept := next.byName[name]; kept {
				continue
			}
			members := g.retire()
			s.logger().Info("tunnel group removed", "group", name, "members", len(members))
			s.Metrics.groupRemoved(g)
			for _, m := range members {
				_ = m.conn.CloseWithError(protocol.CodeOK, "tunnel group removed")
			}
		}
	}
	for _, g := range next.byName {
		s.Metrics.setMembers(g)
	}
	return nil
}

// Serve accepts tunnel connections from ln and registers them, each in its
// own goroutine, until ln fails or the server is shut down. It always
// returns a non-nil error; after Shutdown or Close it is ErrServerClosed.
// The caller keeps ownership of ln and closes it. ln's quic.Transport
// should take VerifySourceAddress and ConnContext from s, so that new
// connections prove their address before a handshake and the registration
// rate limit applies before it too.
func (s *Server) Serve(ln *quic.Listener) error {
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			return fmt.Errorf("tunnel: accepting connections: %w", err)
		}
		if conn.Context().Value(admittedKey{}) == nil && !s.allowAddr(conn.RemoteAddr()) {
			s.Metrics.registration(nil, "rate_limited")
			_ = conn.CloseWithError(protocol.CodeServerError, "too many registrations")
			continue
		}
		if !s.track(conn) {
			_ = conn.CloseWithError(protocol.CodeOK, "server shutting down")
			return ErrServerClosed
		}
		go s.handle(conn)
	}
}

func (s *Server) allowAddr(addr net.Addr) bool {
	if s.RegistrationRate <= 0 {
		return true
	}
	s.limiterOnce.Do(func() { s.limiter = newRegistrationLimiter(s.RegistrationRate, s.RegistrationBurst) })
	return s.limiter.allow(addr)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) track(conn *quic.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[*quic.Conn]struct{}{}
	}
	s.conns[conn] = struct{}{}
	s.inflight.Add(1)
	return true
}

func (s *Server) untrack(conn *quic.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, conn)
	s.inflight.Done()
}

// Shutdown stops the server gracefully: new registrations are refused, and
// once ctx is done or every tunnel connection has ended by itself,
// the remaining connections are closed with code 0x0. The HTTP frontend is
// the caller's: shut it down first so that in-flight requests finish.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeAll("server shutting down")
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes every tunnel connection at once with code 0x0.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeAll("server shutting down")
	return nil
}

func (s *Server) closeAll(reason string) {
	s.mu.Lock()
	conns := make([]*quic.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.CloseWithError(protocol.CodeOK, reason)
	}
}

// Members returns the number of members of each group.
func (s *Server) Members() map[string]int {
	t := s.table.Load()
	if t == nil {
		return map[string]int{}
	}
	out := make(map[string]int, len(t.byName))
	for name, g := range t.byName {
		out[name] = g.size()
	}
	return out
}

// GroupStatus describes a group for operators.
type GroupStatus struct {
	Name    string         `json:"name"`
	Hosts   []string       `json:"hosts"`
	Members []MemberStatus `json:"members"`
}

// MemberStatus describes one registered tunnel connection.
type MemberStatus struct {
	RemoteAddr string    `json:"remoteAddr"`
	Since      time.Time `json:"since"`
	InFlight   int64     `json:"inFlight"`
	Draining   bool      `json:"draining"`
	// DataConns is the number of the member's data connections (TCP),
	// which carry its plain requests while one is idle.
	DataConns int `json:"dataConns"`
}

// Status returns every group with its hosts and members, sorted by name.
func (s *Server) Status() []GroupStatus {
	t := s.table.Load()
	if t == nil {
		return []GroupStatus{}
	}
	out := make([]GroupStatus, 0, len(t.byName))
	for name, g := range t.byName {
		gs := GroupStatus{Name: name, Hosts: []string{}, Members: []MemberStatus{}}
		if h := g.hosts.Load(); h != nil {
			gs.Hosts = *h
		}
		for _, m := range *g.members.Load() {
			gs.Members = append(gs.Members, MemberStatus{
				RemoteAddr: m.remote.String(),
				Since:      m.since,
				InFlight:   m.inflight.Load(),
				Draining:   m.draining.Load(),
				DataConns:  m.data.size(),
			})
		}
		out = append(out, gs)
	}
	slices.SortFunc(out, func(a, b GroupStatus) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// HasGroups reports whether SetGroups has been called.
func (s *Server) HasGroups() bool { return s.table.Load() != nil }
