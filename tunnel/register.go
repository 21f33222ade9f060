package tunnel

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/protocol"
)

// handle runs one tunnel connection: registration, then membership until
// the connection ends.
func (s *Server) handle(conn *quic.Conn) {
	defer s.untrack(conn)
	log := s.logger().With("remote", conn.RemoteAddr().String())

	g, m, stream, req, err := s.register(conn)
	if err != nil {
		code, reason, result := closeFor(err)
		s.Metrics.registration(g, result)
		log.Warn("registration refused", "group", label(g), "reason", reason, "error", err)
		_ = conn.CloseWithError(code, reason)
		return
	}

	defer s.dropData(m)
	s.Metrics.registration(g, "ok")
	s.Metrics.setMembers(g)
	log.Info("member registered", "group", g.name, "members", g.size())
	go s.control(stream, m, log.With("group", g.name))
	go func() {
		// A bidirectional stream from the member, the HTTP/3 server, is a
		// connection error (RFC 9114 §6.1); left unaccepted, what it
		// carries would sit in flow control for the member's life.
		if str, err := conn.AcceptStream(conn.Context()); err == nil {
			m.cc.HandleBidirectionalStream(str)
		}
	}()

	s.watch(conn, keepAlive(req.Metadata[protocol.MetadataKeepAlive]))
	if g.remove(m) {
		s.Metrics.setMembers(g)
	}
	log.Info("member left", "group", g.name, "members", g.size(), "cause", context.Cause(conn.Context()))
}

// register reads, authenticates and answers the register request on the
// first stream, and returns the new member, already in its group. The
// returned group is non-nil whenever the request named a known group, so
// that failures can be attributed.
func (s *Server) register(conn *quic.Conn) (*group, *member, *quic.Stream, *protocol.RegisterRequest, error) {
	ctx, cancel := context.WithTimeout(conn.Context(), s.registerTimeout())
	defer cancel()

	stream, err := conn.AcceptStream(ctx)
	if err != nil {
		if timedOut(ctx, err) {
			err = errors.Join(errTimeout, err)
		}
		return nil, nil, nil, nil, errors.Join(protocol.ErrBadRequest, err)
	}
	deadline, _ := ctx.Deadline()
	_ = stream.SetDeadline(deadline)
	req, err := protocol.ReadRequest(stream)
	if err != nil {
		stream.CancelRead(0)
		if timedOut(ctx, err) {
			err = errors.Join(errTimeout, err)
		}
		return nil, nil, nil, nil, err
	}

	g := s.table.Load().lookupName(req.TunnelGroup)
	if g == nil {
		return nil, nil, nil, nil, protocol.ErrNotFound
	}
	if auth := g.authenticator(); auth != nil {
		if err := auth.Authenticate(ctx, req.Metadata); err != nil {
			return g, nil, nil, nil, err
		}
	}
	m := &member{
		conn:   conn,
		cc:     s.transport().NewClientConn(conn),
		remote: conn.RemoteAddr(),
		since:  time.Now(),
	}
	resp := &protocol.RegisterResponse{Version: protocol.Version, Code: protocol.ResponseOK}
	if token := s.offerData(m, req.Metadata[protocol.MetadataData]); token != "" {
		resp.Metadata = map[string]string{protocol.MetadataData: token}
	}
	// The member joins before the client hears that it is registered, so
	// that a request sent on the strength of the answer finds it. Requests
	// that arrive first wait in QUIC's stream queue until the client serves.
	if !g.add(m) {
		s.dropData(m)
		return g, nil, nil, nil, protocol.ErrNotFound
	}
	if err := protocol.WriteResponse(stream, resp); err != nil {
		// Another registration may have counted m in the gauge meanwhile.
		if g.remove(m) {
			s.Metrics.setMembers(g)
		}
		s.dropData(m)
		return g, nil, nil, nil, err
	}
	_ = stream.SetDeadline(time.Time{})
	// Our side is done; the client's side stays open for control messages.
	_ = stream.Close()
	return g, m, stream, req, nil
}

// registerTimeout bounds a registration, and a data connection's hello.
func (s *Server) registerTimeout() time.Duration {
	if s.RegisterTimeout > 0 {
		return s.RegisterTimeout
	}
	return DefaultRegisterTimeout
}

// keepAlive parses a member's announced keep-alive period; zero means
// none or one too odd to rely on.
func keepAlive(v string) time.Duration {
	d, err := time.ParseDuration(v)
	if err != nil || d < 50*time.Millisecond || d > 30*time.Second {
		return 0
	}
	return d
}

// watch returns when conn ends. A member that announced its keep-alive
// period is closed once nothing arrived from it for keepAliveMisses
// keep-alive gaps: its process died or its network is gone, and its
// requests fail over now rather than after the transport's idle timeout.
func (s *Server) watch(conn *quic.Conn, period time.Duration) {
	if period == 0 {
		<-conn.Context().Done()
		return
	}
	tick := time.NewTicker(period / 2)
	defer tick.Stop()
	last, lastAt := conn.ConnectionStats().PacketsReceived, time.Now()
	for {
		select {
		case <-conn.Context().Done():
			return
		case now := <-tick.C:
			if n := conn.ConnectionStats().PacketsReceived; n != last {
				last, lastAt = n, now
				continue
			}
			if now.Sub(lastAt) >= keepAliveMisses*keepAliveGap(conn, period) {
				_ = conn.CloseWithError(protocol.CodeServerError, "keep-alive timeout")
				<-conn.Context().Done()
				return
			}
		}
	}
}

// keepAliveMisses is how many keep-alive gaps of silence declare a member
// dead: enough to ride out a lost packet and a scheduling hiccup.
const keepAliveMisses = 4

// keepAliveGap is the longest a live member may stay silent between two
// keep-alives. quic-go sends one max(period, 1.5 PTO) after the last
// packet it received, the acknowledgement of the previous one, which comes
// a round trip later: on a slow path (satellite, a weak mobile link) the
// gap is well over the period. On loopback or a LAN it is the period.
func keepAliveGap(conn *quic.Conn, period time.Duration) time.Duration {
	st := conn.ConnectionStats()
	// The PTO as RFC 9002 computes it, with quic-go's max ack delay.
	pto := st.SmoothedRTT + max(4*st.MeanDeviation, time.Millisecond) + 25*time.Millisecond
	return max(period, pto*3/2) + st.SmoothedRTT
}

// control reads the member's control messages until its stream or
// connection ends. A client that never sends any is an older client.
func (s *Server) control(stream *quic.Stream, m *member, log *slog.Logger) {
	r := protocol.NewControlReader(stream)
	for {
		msg, err := r.Next()
		if err != nil {
			stream.CancelRead(0)
			return
		}
		if msg.Type == protocol.ControlDrain && !m.draining.Swap(true) {
			log.Info("member draining")
			m.data.closeIdle()
		}
	}
}

var errTimeout = errors.New("no register request in time")

// timedOut tells whether a step of the registration failed because the
// register timeout ran out: ctx's deadline or the stream's, set to it. A
// connection that ended first (the client closed it, went silent past the
// idle timeout, or the server shut down) also ends ctx, which derives from
// it, but was not too slow.
func timedOut(ctx context.Context, err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded)
}

// closeFor maps a registration failure to the QUIC close code and reason
// of the protocol, and to the metric result.
func closeFor(err error) (quic.ApplicationErrorCode, string, string) {
	switch {
	case errors.Is(err, errTimeout):
		// Slow is not malformed: a client on a stalled or lossy network
		// takes "bad request" as final, and the server error code lets it
		// retry (after its backoff, and within the registration rate).
		return protocol.CodeServerError, "register request timed out", "timeout"
	case errors.Is(err, protocol.ErrBadRequest):
		return protocol.CodeClientError, protocol.ReasonBadRequest, "bad_request"
	case errors.Is(err, protocol.ErrNotFound):
		return protocol.CodeClientError, protocol.ReasonNotFound, "not_found"
	case errors.Is(err, protocol.ErrUnauthorized):
		return protocol.CodeClientError, protocol.ReasonUnauthorized, "unauthorized"
	default:
		return protocol.CodeServerError, "server error", "error"
	}
}
