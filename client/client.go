// Package client lets an [http.Handler] behind NAT or a firewall serve
// requests that arrive at a reverst tunnel server.
//
// A [Server] dials the tunnel server over QUIC, registers in a tunnel
// group, and then serves HTTP/3 on that same connection: the roles flip,
// and the tunnel server sends its visitors' requests to the handler. When
// the tunnel server offers them, the Server also opens TCP data
// connections to the same address and serves HTTP/1.1 on them, which the
// tunnel server prefers for plain requests (see [Server.QUICOnly]). When
// the connection drops or the tunnel server cannot be reached, the Server
// dials again with capped exponential backoff and jitter, for as long as
// the context given to [Server.DialAndServe] lives. Only a refusal that
// retrying cannot fix ([ErrUnauthorized], [ErrBadRequest], and by default
// [ErrNotFound]) ends it early.
//
// When the tunnel server runs as several replicas behind one name (such as
// a Kubernetes headless Service), DialAndServe registers on every address
// the name resolves to and follows the replicas as they come and go, so
// that any replica can serve any request.
//
//	srv := &client.Server{
//		TunnelGroup:   "flipt.dev.local",
//		Handler:       mux,
//		Authenticator: client.BasicAuthenticator("user", "pass"),
//	}
//	err := srv.DialAndServe(ctx, "tunnel.example.com:7171")
//
// The wire protocol is described in package protocol.
package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/reverst-dev/reverst/protocol"
)

// Errors returned by [Server.DialAndServe]. The refusals are the protocol
// package's sentinels, so errors.Is matches either name.
var (
	// ErrUnauthorized: the tunnel server rejected the credentials.
	ErrUnauthorized = protocol.ErrUnauthorized
	// ErrNotFound: the tunnel server has no group with that name.
	ErrNotFound = protocol.ErrNotFound
	// ErrBadRequest: the tunnel server could not accept the register
	// request (malformed, unsupported version, empty group).
	ErrBadRequest = protocol.ErrBadRequest
	// ErrServerClosed is returned by DialAndServe after Shutdown or Close,
	// or once its context is done. It is [http.ErrServerClosed], so code
	// that already checks for that keeps working.
	ErrServerClosed = http.ErrServerClosed
)

// Defaults used for zero-valued [Server] fields.
const (
	DefaultMinBackoff      = 100 * time.Millisecond
	DefaultMaxBackoff      = time.Second
	DefaultRegisterTimeout = 10 * time.Second
	DefaultResolveInterval = 30 * time.Second
)

// Defaults of the QUIC configuration used when [Server.QUICConfig] is nil.
const (
	// DefaultHandshakeIdleTimeout bounds one dial of an unreachable server.
	// Together with DefaultMaxBackoff it keeps a dial in flight almost
	// continuously during an outage, so that the tunnel is back within
	// about a second of the server.
	DefaultHandshakeIdleTimeout = 1500 * time.Millisecond
	// DefaultKeepAlivePeriod keeps NAT bindings open and, with
	// DefaultMaxIdleTimeout, lets either side notice a dead peer quickly.
	DefaultKeepAlivePeriod = 250 * time.Millisecond
	// DefaultMaxIdleTimeout is how long a silent connection lives on the
	// client's side: it notices a dead server within about a second. The
	// server learns the keep-alive period from the register request
	// (protocol.MetadataKeepAlive) and drops a dead member within about
	// four periods. The cost is a keep-alive packet every
	// DefaultKeepAlivePeriod; raise both on lossy networks.
	DefaultMaxIdleTimeout = 1200 * time.Millisecond
)

// closing reasons sent with protocol.CodeOK.
const (
	reasonShutdown = "client shutting down"
	reasonClosed   = "client closed"
	reasonRetired  = "tunnel address no longer resolves"
)

// A Server registers with a reverst tunnel server and serves Handler to
// it. TunnelGroup is required; every other field has a useful zero value.
// Fields must not be changed once DialAndServe has been called.
//
// DialAndServe may be called several times, concurrently, for different
// tunnel server addresses; Shutdown and Close act on all of them.
type Server struct {
	// TunnelGroup is the name of the group to join. Required.
	TunnelGroup string

	// Handler serves the requests the tunnel server forwards. They carry
	// the visitor's Host header. If nil, [http.DefaultServeMux] is used.
	// A panic in Handler answers 500 to that request (or resets its stream
	// if the response had already started) and never ends the tunnel.
	Handler http.Handler

	// TLSConfig verifies the tunnel server. If nil, the system roots are
	// used. It is cloned, never modified: the clone's NextProtos is set to
	// the tunnel ALPN, and its ServerName, when empty, to the host part of
	// the address given to DialAndServe.
	TLSConfig *tls.Config

	// QUICConfig configures the QUIC connection; it is cloned. If nil, a
	// configuration with DefaultHandshakeIdleTimeout, DefaultKeepAlivePeriod
	// and DefaultMaxIdleTimeout is used. Without a KeepAlivePeriod an idle
	// tunnel may be dropped by NATs and time out.
	QUICConfig *quic.Config

	// Authenticator adds credentials to each register request. If nil, the
	// request carries none, which only an open group accepts.
	Authenticator Authenticator

	// Logger receives the Server's log lines. If nil, [slog.Default] is
	// used. Credentials are never logged.
	Logger *slog.Logger

	// OnConnectionReady, if set, is called after each successful
	// registration, before the first request is served on the connection.
	// It is called synchronously and should return quickly; with several
	// server replicas (see DialAndServe), concurrently for their
	// connections.
	OnConnectionReady func(ConnectionInfo)

	// MinBackoff and MaxBackoff bound the delay between connection
	// attempts, measured from the start of the previous attempt (or from
	// the end of a connection that was registered): the delay starts at
	// MinBackoff, doubles after each failure up to MaxBackoff, and is
	// jittered into [d/2, d]. Zero means DefaultMinBackoff and
	// DefaultMaxBackoff.
	MinBackoff time.Duration
	MaxBackoff time.Duration

	// RegisterTimeout bounds the Authenticator's call, and the register
	// exchange after the QUIC handshake. Zero means
	// DefaultRegisterTimeout.
	RegisterTimeout time.Duration

	// Transport, if set, carries every connection over its one UDP socket,
	// which many Servers may share: a process holding thousands of tunnels
	// then needs one socket instead of one each. If nil, each connection
	// gets a socket of its own. The caller owns the Transport and closes it
	// after the Servers are done.
	Transport *quic.Transport

	// RetryNotFound makes DialAndServe treat an unknown tunnel group like
	// any other failure and keep retrying, for groups that appear when the
	// server reloads its configuration. By default it returns ErrNotFound.
	RetryNotFound bool

	// Resolver looks up the addresses of the tunnel server's host name.
	// If nil, [net.DefaultResolver] is used. Tests and custom discovery
	// can supply their own.
	Resolver Resolver

	// ResolveInterval is how often the host name is resolved again to
	// follow replicas that come and go. Zero means DefaultResolveInterval.
	ResolveInterval time.Duration

	// QUICOnly keeps every request on the QUIC connection. By default a
	// Server asks the tunnel server for data connections (see package
	// protocol): TCP connections beside the QUIC one, to the same address
	// and port, that carry plain requests over HTTP/1.1 with less latency
	// than quic-go, and bulk bodies several times faster. Where TCP to the
	// tunnel server is blocked, the Server notices and rests on QUIC by
	// itself; QUICOnly saves it the attempts.
	QUICOnly bool

	batches sync.Pool // data connection write batches (see coalescingConn)

	mu         sync.Mutex
	closed     bool
	done       chan struct{} // closed by Shutdown and Close
	conns      map[*tunnelConn]struct{}
	onShutdown []func()
}

// RegisterOnShutdown registers f to be called, in a goroutine of its own,
// when Shutdown starts, as net/http's Server.RegisterOnShutdown: handlers
// that hold a response open (a WebSocket, an event stream) learn there
// that they should end it, which Shutdown otherwise waits for until its
// context is done.
func (s *Server) RegisterOnShutdown(f func()) {
	s.mu.Lock()
	s.onShutdown = append(s.onShutdown, f)
	s.mu.Unlock()
}

// ConnectionInfo describes a registered tunnel connection.
type ConnectionInfo struct {
	// Addr is the address given to DialAndServe. RemoteAddr tells which
	// of the addresses its host resolved to this connection reached.
	Addr string
	// LocalAddr and RemoteAddr are the UDP addresses of the connection.
	LocalAddr, RemoteAddr net.Addr
	// Response is the tunnel server's register response.
	Response *protocol.RegisterResponse
}

// DialAndServe connects to the tunnel server at addr (host:port), registers
// in s.TunnelGroup and serves s.Handler until the connection ends, then
// connects again, with backoff, until ctx is done or Shutdown or Close is
// called.
//
// When host is a name, DialAndServe keeps one registration on every
// address it resolves to, as a Kubernetes headless Service returns one
// address per server replica, so that whichever replica receives a
// visitor's request has a connection to send it on. Each address has its
// own connection and reconnect loop. Until the name first resolves, it is
// looked up again with the backoff of a connection attempt. Then it is
// resolved again every ResolveInterval, and sooner (at most once a
// second) after a connection fails; a connection to an address that no
// longer resolves is drained like on Shutdown (closed after at most 30s),
// and a new address is joined. When the name resolves to IPv4 and IPv6
// addresses, only the IPv4 ones are used, as a dialer would pick. Every
// connection verifies the server as host, not as the address. An IP
// literal host is dialled as is.
//
// It always returns a non-nil error. After Shutdown or Close, or when ctx
// is done, the error matches [ErrServerClosed] (and, for ctx, also the
// context's cause, such as [context.Canceled]). When the server at any
// address refuses the registration it returns at once, without retrying
// and after closing its other connections, an error matching
// [ErrUnauthorized], [ErrBadRequest] or, unless RetryNotFound is set,
// [ErrNotFound]. Any other failure (unresolvable name, unreachable server,
// TLS errors, server errors, a dropped connection) is logged and retried.
//
// Cancelling ctx closes the served connections at once; use Shutdown to
// let requests in flight finish.
func (s *Server) DialAndServe(ctx context.Context, addr string) error {
	if s.TunnelGroup == "" {
		return fmt.Errorf("client: %w: empty TunnelGroup", ErrBadRequest)
	}
	tlsConf, err := s.tlsConfig(addr)
	if err != nil {
		return err
	}
	host, portName, _ := net.SplitHostPort(addr) // checked by tlsConfig
	port, err := net.DefaultResolver.LookupPort(ctx, "udp", portName)
	if err != nil {
		return fmt.Errorf("client: tunnel address %q: %w", addr, err)
	}

	done, ok := s.doneChan()
	if !ok {
		return ErrServerClosed
	}
	// dialCtx bounds resolving, dialing, registering and waiting between
	// attempts. Served connections are bound by ctx only: Shutdown drains
	// them instead.
	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-done:
			cancel()
		case <-dialCtx.Done():
		}
	}()

	rs := &replicaSet{
		s:        s,
		addr:     addr,
		host:     host,
		port:     uint16(port),
		tlsConf:  tlsConf,
		quicConf: s.quicConfig(),
		log:      s.logger().With("tunnel_address", addr, "group", s.TunnelGroup),
	}
	return rs.run(ctx, dialCtx)
}

// dialLoop registers on one address of a replica set and serves, again
// and again with backoff. It returns nil once the address is retired and
// its connection drained, the stopped error once s is closed or ctx done,
// and a permanent refusal at once.
func (s *Server) dialLoop(ctx context.Context, rs *replicaSet, r *replica) error {
	log := rs.log.With("remote", r.addr.String())
	dialAddr := r.addr.String()

	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done, _ := s.doneChan()
	go func() {
		select {
		case <-done:
		case <-r.retire:
		case <-dialCtx.Done():
		}
		cancel()
	}()

	var (
		failures int
		lastErr  string
	)
	for {
		start := time.Now()
		tc, err := s.connect(dialCtx, dialAddr, rs.tlsConf, rs.quicConf)
		if err == nil {
			log.Info("tunnel registered")
			err = s.serve(ctx, rs.addr, rs.tlsConf, tc, r.retire)
			if time.Since(start) >= s.maxBackoff() {
				// Only a connection that lasted resets the backoff, so
				// that a server accepting and dropping at once is not
				// hammered.
				failures = 0
			}
			start = time.Now()
		}
		if err := s.stopped(ctx); err != nil {
			return err
		}
		if r.retired() {
			log.Info("tunnel address retired")
			return nil
		}
		if s.permanent(err) {
			log.Error("tunnel registration refused", "error", err)
			return err
		}
		// The replica may have moved to a new address.
		rs.kickResolve()

		delay := backoff(s.minBackoff(), s.maxBackoff(), failures)
		failures++
		wait := max(time.Until(start.Add(delay)), 0)
		level := slog.LevelDebug
		if msg := err.Error(); msg != lastErr {
			// Repeats of the same failure during an outage go to debug.
			level, lastErr = slog.LevelWarn, msg
		}
		log.Log(ctx, level, "tunnel connection failed, retrying", "error", err, "attempt", failures, "retry_in", wait.Round(time.Millisecond))

		// The next round sees a done dialCtx.
		sleep(dialCtx, wait)
	}
}

// Shutdown stops s gracefully: DialAndServe stops connecting, and each
// registered connection tells the tunnel server it is draining (the
// protocol's drain control message), keeps serving until no request is in
// flight, then is closed with [protocol.CodeOK]. Shutdown returns once
// every connection has been closed and its handlers have returned, or when
// ctx is done, in which case the remaining connections are closed at once
// and ctx's error is returned.
//
// A server that does not know the drain message keeps sending requests
// while the connection drains; they are served too, and the connection is
// closed at the first moment none is in flight.
func (s *Server) Shutdown(ctx context.Context) error {
	conns := s.close()
	s.mu.Lock()
	for _, f := range s.onShutdown {
		go f()
	}
	s.mu.Unlock()
	for _, tc := range conns {
		tc.drain()
	}
	for _, tc := range conns {
		select {
		case <-tc.done:
		case <-ctx.Done():
			for _, tc := range conns {
				tc.close(reasonShutdown)
			}
			return ctx.Err()
		}
	}
	return nil
}

// Close stops s at once: DialAndServe stops connecting and every
// registered connection is closed with [protocol.CodeOK], failing the
// requests in flight. It does not wait for handlers to return.
func (s *Server) Close() error {
	for _, tc := range s.close() {
		tc.close(reasonClosed)
	}
	return nil
}

// connect dials addr and registers. The returned connection is tracked.
// dial opens a QUIC connection, on s.Transport's socket when there is one.
func (s *Server) dial(ctx context.Context, addr string, tlsConf *tls.Config, quicConf *quic.Config) (*quic.Conn, error) {
	if s.Transport == nil {
		return quic.DialAddr(ctx, addr, tlsConf, quicConf)
	}
	udpAddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	return s.Transport.Dial(ctx, udpAddr, tlsConf, quicConf)
}

func (s *Server) connect(ctx context.Context, addr string, tlsConf *tls.Config, quicConf *quic.Config) (*tunnelConn, error) {
	// The credentials come first: the server gives a connection a few
	// seconds from its handshake to register, and a slow token fetch must
	// not spend them.
	req, err := s.newRequest(ctx)
	if err != nil {
		return nil, fmt.Errorf("registering: %w", err)
	}
	conn, err := s.dial(ctx, addr, tlsConf, quicConf)
	if err != nil {
		return nil, fmt.Errorf("dialing: %w", err)
	}
	control, resp, err := s.register(ctx, conn, req)
	if err != nil {
		_ = conn.CloseWithError(protocol.CodeOK, reasonClosed)
		return nil, fmt.Errorf("registering: %w", err)
	}
	tc := newTunnelConn(conn, control, resp, s.handler(), s.logger())
	if !s.track(tc) {
		_ = conn.CloseWithError(protocol.CodeOK, reasonShutdown)
		return nil, ErrServerClosed
	}
	return tc, nil
}

// newRequest builds the register request, the Authenticator's
// credentials included.
func (s *Server) newRequest(ctx context.Context) (*protocol.RegisterRequest, error) {
	ctx, cancel := context.WithTimeout(ctx, s.registerTimeout())
	defer cancel()
	req := &protocol.RegisterRequest{
		Version:     protocol.Version,
		TunnelGroup: s.TunnelGroup,
		Metadata:    map[string]string{},
	}
	if qc := s.quicConfig(); qc.KeepAlivePeriod > 0 {
		// Lets the server drop this connection within a few periods if it
		// dies, rather than after quic-go's 5 s floor on idle timeouts.
		period := qc.KeepAlivePeriod
		if qc.MaxIdleTimeout > 0 {
			period = min(period, qc.MaxIdleTimeout/2)
		}
		req.Metadata[protocol.MetadataKeepAlive] = period.String()
	}
	if !s.QUICOnly {
		req.Metadata[protocol.MetadataData] = protocol.DataHTTP1
	}
	if s.Authenticator != nil {
		if err := s.Authenticator.Authenticate(ctx, req); err != nil {
			return nil, fmt.Errorf("authenticator: %w", err)
		}
	}
	return req, nil
}

// register runs the register exchange on the first stream of conn, and
// returns that stream for control messages.
func (s *Server) register(ctx context.Context, conn *quic.Conn, req *protocol.RegisterRequest) (*quic.Stream, *protocol.RegisterResponse, error) {
	timeout := s.registerTimeout()
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("no register response within %v: %w", timeout, context.DeadlineExceeded))
	defer cancel()
	// Closing the connection is the one way to interrupt every blocking
	// step below at once, including the response read.
	stop := context.AfterFunc(ctx, func() { _ = conn.CloseWithError(protocol.CodeOK, reasonClosed) })
	defer stop()
	fail := func(err error) error {
		err = closeError(conn, err)
		var appErr *quic.ApplicationError
		if ctx.Err() != nil && !(errors.As(err, &appErr) && appErr.Remote) {
			// ctx (or our close above) ended the step, unless the server
			// closed first: the operator needs to know why (a server that
			// never answered), not that the client closed.
			return context.Cause(ctx)
		}
		return err
	}

	stream, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, nil, fail(err)
	}
	if err := protocol.WriteRequest(stream, req); err != nil {
		return nil, nil, fail(err)
	}
	resp, err := protocol.ReadResponse(stream)
	if err != nil {
		if resp != nil {
			// A legacy refusal code in a decoded response.
			return nil, nil, err
		}
		return nil, nil, fail(err)
	}
	// Our side of the stream stays open for control messages (drain).
	_ = stream.SetDeadline(time.Time{})
	return stream, resp, nil
}

// closeError explains a failed step of the register exchange: when the
// server closed the connection, its code and reason say why.
func closeError(conn *quic.Conn, err error) error {
	if mapped := protocol.CloseError(err); mapped != err {
		return mapped
	}
	if conn.Context().Err() != nil {
		return protocol.CloseError(context.Cause(conn.Context()))
	}
	return err
}

// serve serves HTTP/3 on a registered connection until it ends, and
// returns why it ended. Once retire is closed the connection drains.
func (s *Server) serve(ctx context.Context, addr string, tlsConf *tls.Config, tc *tunnelConn, retire <-chan struct{}) error {
	if s.OnConnectionReady != nil {
		s.OnConnectionReady(ConnectionInfo{
			Addr:       addr,
			LocalAddr:  tc.conn.LocalAddr(),
			RemoteAddr: tc.conn.RemoteAddr(),
			Response:   tc.resp,
		})
	}
	stop := context.AfterFunc(ctx, func() { tc.close(reasonClosed) })
	defer stop()
	if token := tc.resp.Metadata[protocol.MetadataData]; token != "" && !s.QUICOnly {
		d := newDataConns(tc, tlsConf, token, &s.batches)
		tc.mu.Lock()
		tc.data = d
		tc.mu.Unlock()
		tc.dataWG.Go(d.run)
		defer tc.dataWG.Wait()
	}
	go func() {
		select {
		case <-retire:
		case <-tc.done:
			return
		}
		tc.drain()
		timer := time.NewTimer(retireTimeout)
		defer timer.Stop()
		select {
		case <-timer.C:
			tc.close(reasonRetired)
		case <-tc.done:
		}
	}()

	// The http3.Server is never shut down: its GOAWAY carries a stream ID
	// the tunnel server rejects in the reversed roles (see the protocol
	// doc). The connection is closed by us or by the peer instead.
	// net/http's server key, which http3 does not set, tells handlers
	// that a server recovers http.ErrAbortHandler and cuts the response:
	// without it httputil.ReverseProxy ends a response it could not copy
	// whole as if it were complete. The value stands for the tunnel and
	// serves nothing; data connections set one of their own.
	tunnelServer := &http.Server{Handler: tc}
	var h3Log *slog.Logger
	if s.Logger != nil {
		h3Log = slog.New(querylessHandler{s.Logger.Handler()})
	}
	h3 := &http3.Server{Handler: tc, Logger: h3Log, ConnContext: func(ctx context.Context, _ *quic.Conn) context.Context {
		return context.WithValue(ctx, http.ServerContextKey, tunnelServer)
	}}
	// ServeQUICConn returns only once every handler has. One that ignores
	// its context must neither keep a lost connection from being dialled
	// again nor DialAndServe from returning after Close, which net/http's
	// Serve does not wait for either; the connection stays tracked until
	// its handlers are done, so that Shutdown waits for them.
	served := make(chan error, 1)
	go func() {
		defer s.untrack(tc)
		defer close(tc.done)
		err := h3.ServeQUICConn(tc.conn)
		// ServeQUICConn can also fail on a live connection (no control
		// stream); do not leave it open.
		tc.close(reasonClosed)
		tc.dataWG.Wait()
		tc.waitDataHandlers()
		served <- err
	}()
	var serveErr error
	select {
	case serveErr = <-served:
	case <-tc.conn.Context().Done():
	}

	cause := protocol.CloseError(context.Cause(tc.conn.Context()))
	if serveErr != nil && !errors.Is(serveErr, cause) {
		return fmt.Errorf("tunnel connection closed: %w (serving: %v)", cause, serveErr)
	}
	return fmt.Errorf("tunnel connection closed: %w", cause)
}

// permanent reports whether err is a refusal that retrying cannot fix.
func (s *Server) permanent(err error) bool {
	return errors.Is(err, ErrUnauthorized) ||
		errors.Is(err, ErrBadRequest) ||
		(!s.RetryNotFound && errors.Is(err, ErrNotFound))
}

// stopped returns the error DialAndServe ends with once s is closed or ctx
// is done, and nil otherwise.
func (s *Server) stopped(ctx context.Context) error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrServerClosed
	}
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrServerClosed, context.Cause(ctx))
	}
	return nil
}

func (s *Server) doneChan() (<-chan struct{}, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		s.done = make(chan struct{})
	}
	return s.done, !s.closed
}

// close marks s closed and returns the connections to stop.
func (s *Server) close() []*tunnelConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		if s.done == nil {
			s.done = make(chan struct{})
		}
		close(s.done)
	}
	conns := make([]*tunnelConn, 0, len(s.conns))
	for tc := range s.conns {
		conns = append(conns, tc)
	}
	return conns
}

// track adds tc to the connections Shutdown and Close act on. It reports
// false when s is already closed.
func (s *Server) track(tc *tunnelConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = make(map[*tunnelConn]struct{})
	}
	s.conns[tc] = struct{}{}
	return true
}

func (s *Server) untrack(tc *tunnelConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, tc)
}

func (s *Server) tlsConfig(addr string) (*tls.Config, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("client: tunnel address %q: %w", addr, err)
	}
	if host == "" {
		// Fine for a listener, but there is nothing to resolve or verify
		// here: every attempt would fail, for ever.
		return nil, fmt.Errorf("client: tunnel address %q: missing host", addr)
	}
	conf := &tls.Config{}
	if s.TLSConfig != nil {
		conf = s.TLSConfig.Clone()
	}
	conf.NextProtos = []string{protocol.ALPN}
	if conf.ServerName == "" {
		conf.ServerName = host
	}
	return conf, nil
}

func (s *Server) quicConfig() *quic.Config {
	if s.QUICConfig != nil {
		return s.QUICConfig.Clone()
	}
	return &quic.Config{
		HandshakeIdleTimeout: DefaultHandshakeIdleTimeout,
		KeepAlivePeriod:      DefaultKeepAlivePeriod,
		MaxIdleTimeout:       DefaultMaxIdleTimeout,
	}
}

func (s *Server) handler() http.Handler {
	if s.Handler != nil {
		return s.Handler
	}
	return http.DefaultServeMux
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) minBackoff() time.Duration {
	if s.MinBackoff > 0 {
		return s.MinBackoff
	}
	return DefaultMinBackoff
}

func (s *Server) maxBackoff() time.Duration {
	if s.MaxBackoff > 0 {
		return max(s.MaxBackoff, s.minBackoff())
	}
	return max(DefaultMaxBackoff, s.minBackoff())
}

func (s *Server) resolver() Resolver {
	if s.Resolver != nil {
		return s.Resolver
	}
	return net.DefaultResolver
}

func (s *Server) resolveInterval() time.Duration {
	if s.ResolveInterval > 0 {
		return s.ResolveInterval
	}
	return DefaultResolveInterval
}

func (s *Server) registerTimeout() time.Duration {
	if s.RegisterTimeout > 0 {
		return s.RegisterTimeout
	}
	return DefaultRegisterTimeout
}

// sleep waits d and reports true, or reports false as soon as ctx is done.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// backoff returns the jittered delay before the attempt that follows
// failures consecutive failures: lo doubled per failure, capped at hi, then
// drawn from [d/2, d] so that many clients cut off together do not come
// back together.
func backoff(lo, hi time.Duration, failures int) time.Duration {
	d := lo
	for i := 0; i < failures && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + rand.N(d/2+1)
}
