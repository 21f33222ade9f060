package tunnel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http/httpguts"

	"github.com/reverst-dev/reverst/protocol"
)

// isUpgrade reports whether r asks to switch protocols (WebSocket, …). A
// request with a body is not taken for one (RFC 9110 §7.8 lets a server
// ignore Upgrade) but proxied as a plain request: once its body is read,
// net/http reads on the connection itself, which then is not ours to
// read after the hijack. No WebSocket handshake has a body.
func isUpgrade(r *http.Request) bool {
	return r.ProtoMajor == 1 && r.Header.Get("Upgrade") != "" &&
		r.ContentLength == 0 && len(r.TransferEncoding) == 0 &&
		httpguts.HeaderValuesContainsToken(r.Header["Connection"], "Upgrade")
}

// serveUpgrade relays an HTTP/1.1 upgrade to a member over an extended
// CONNECT stream (see the protocol package): the member's answer, 101 or
// not, goes back to the visitor byte for byte; after a 101, so does
// everything after it, in both directions, until either side closes.
func (s *Server) serveUpgrade(w http.ResponseWriter, r *http.Request, g *group) int {
	m, str, status := s.upgradeStream(w, r, g)
	if str == nil {
		return status
	}
	defer g.release(m)
	defer str.Close()

	out := r.Clone(context.Background())
	// The visitor's hop-by-hop headers (Proxy-Authorization, what its
	// Connection lists) end here, as in any request; only the upgrade's
	// own two go on, as httputil.ReverseProxy sends them. A "close" it
	// listed would come back from Write as a Connection header of its own.
	protocols := out.Header.Values("Upgrade")
	removeHopByHop(out.Header)
	out.Header["Connection"] = []string{"Upgrade"}
	out.Header["Upgrade"] = protocols
	out.Close = false
	s.setForwarded(out.Header, r)

	visitor, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		textError(w, bodyBadGateway, http.StatusInternalServerError)
		return http.StatusInternalServerError
	}
	defer visitor.Close()
	if err := out.Write(str); err != nil {
		return http.StatusBadGateway
	}
	// The member's answer reaches the visitor as it is read. Only a 101
	// makes the connection a tunnel to the member: after any other answer
	// it ends, or the visitor's next request would go to this member
	// whatever its Host.
	//
	// Until the 101, the visitor's bytes are not the member's to take,
	// but its leaving must still reach the member, whose handler is
	// cancelled then: a peek watches the visitor without taking anything.
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		if _, err := buf.Reader.Peek(1); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
			str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		}
	}()
	// A read deadline already passed ends the peek; bytes it took in are
	// sent first below, after a 101.
	stopWatching := sync.OnceFunc(func() {
		_ = visitor.SetReadDeadline(time.Unix(1, 0))
		<-watched
		_ = visitor.SetReadDeadline(time.Time{})
	})
	defer stopWatching()
	limit := &headerLimit{r: io.TeeReader(str, visitor), n: int64(s.maxResponseHeaderBytes())}
	head := bufio.NewReader(limit)
	for n := 0; ; n++ {
		res, err := http.ReadResponse(head, out)
		if err != nil {
			return http.StatusBadGateway
		}
		if res.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		if res.StatusCode >= 200 || n == max1xx {
			limit.arm(-1)
			_, _ = io.Copy(io.Discard, res.Body)
			str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
			return res.StatusCode
		}
	}
	stopWatching()
	// Bytes the member sent after its 101 are the visitor's already.

	var wg sync.WaitGroup
	wg.Go(func() {
		// Visitor to member: what the server already buffered first.
		_, _ = io.Copy(str, io.MultiReader(io.LimitReader(buf.Reader, int64(buf.Reader.Buffered())), visitor))
		_ = str.Close()
	})
	_, _ = io.Copy(visitor, str)
	if cw, ok := visitor.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	// The member is done; give the visitor a moment to finish its side,
	// then cut it so that nothing lingers.
	_ = visitor.SetReadDeadline(time.Now().Add(5 * time.Second))
	wg.Wait()
	str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	return http.StatusSwitchingProtocols
}

// upgradeStream opens an upgrade stream to a member of g. A member whose
// connection fails first is replaced once: the visitor's request has not
// reached it yet. On failure the visitor is answered and its status
// returned, with a nil stream.
func (s *Server) upgradeStream(w http.ResponseWriter, r *http.Request, g *group) (*member, *http3.RequestStream, int) {
	var tried *member
	for {
		m, err := s.acquire(r.Context(), g, tried)
		if err != nil {
			if tried != nil && errors.Is(err, errNoMember) {
				err = errMemberGone
			}
			return nil, nil, s.proxyError(w, r, g, err)
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		str, err := s.openUpgrade(ctx, m, r)
		cancel()
		if err == nil {
			return m, str, 0
		}
		g.release(m)
		if errors.Is(err, errUpgradeRefused) {
			s.logger().Warn("upgrade refused by member", "group", g.name, "error", err)
			textError(w, bodyNoUpgrade, http.StatusBadGateway)
			return nil, nil, http.StatusBadGateway
		}
		if tried == nil && r.Context().Err() == nil {
			tried = m
			continue
		}
		return nil, nil, s.proxyError(w, r, g, err)
	}
}

const bodyNoUpgrade = "reverst: the tunnel client does not support protocol upgrades (WebSocket)\n"

var errUpgradeRefused = errors.New("member refused the upgrade stream")

func (s *Server) openUpgrade(ctx context.Context, m *member, r *http.Request) (*http3.RequestStream, error) {
	str, err := m.cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, err
	}
	req := &http.Request{
		Method: http.MethodConnect,
		Proto:  protocol.UpgradeProtocol,
		URL:    &url.URL{Scheme: "https", Host: r.Host, Path: "/"},
		Host:   r.Host,
		Header: http.Header{},
	}
	if err := str.SendRequestHeader(req.WithContext(ctx)); err != nil {
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = str.SetReadDeadline(time.Now()) })
	resp, err := str.ReadResponse()
	stop()
	if err != nil {
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		return nil, err
	}
	_ = str.SetReadDeadline(time.Time{})
	if resp.StatusCode != http.StatusOK {
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		return nil, fmt.Errorf("%w: status %d", errUpgradeRefused, resp.StatusCode)
	}
	return str, nil
}
