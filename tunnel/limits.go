package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"
)

// VerifySourceAddress is for quic.Transport.VerifySourceAddress: every new
// connection without a valid address token first proves its source
// address with a Retry (one round trip; registrations are rare). A flood of
// Initial packets, spoofed or not, then costs one stateless Retry packet
// each: no TLS handshake, no connection state, no goroutine.
func (s *Server) VerifySourceAddress(net.Addr) bool { return true }

// admittedKey marks a connection whose registration was counted before its
// handshake by ConnContext.
type admittedKey struct{}

var errRateLimited = errors.New("tunnel: too many registrations")

// ConnContext is for quic.Transport.ConnContext: it applies
// RegistrationRate to validated source addresses before the TLS
// handshake, so that an address over its limit costs a CONNECTION_REFUSED
// packet rather than a handshake. Connections whose address is not
// validated (no VerifySourceAddress) are limited by Serve after the
// handshake, as before: an unvalidated address may be spoofed, and must
// not spend a real client's budget.
func (s *Server) ConnContext(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	if s.RegistrationRate <= 0 || !info.AddrVerified {
		return ctx, nil
	}
	if !s.allowAddr(info.RemoteAddr) {
		s.Metrics.registration(nil, "rate_limited")
		return nil, errRateLimited
	}
	return context.WithValue(ctx, admittedKey{}, true), nil
}

// DefaultQueueTimeout is how long a request waits for a member below
// MaxRequestsPerMember before it is answered 503.
const DefaultQueueTimeout = time.Second

var errBusy = errors.New("every member is at its request limit")

// acquire picks a member of g for one request and counts the request in
// its load; the caller releases it with g.release. When every member is at
// MaxRequestsPerMember the request waits up to QueueTimeout for one to
// free up.
func (s *Server) acquire(ctx context.Context, g *group, except *member) (*member, error) {
	var timer *time.Timer
	got := func(m *member) (*member, error) {
		if timer != nil {
			// The channel holds one wake-up: two slots freed while two
			// requests were between looking and waiting wake only one.
			// Passing it on lets the next waiter find the other slot.
			g.wake()
		}
		return m, nil
	}
	for {
		m := g.pick(except)
		if m == nil {
			return nil, errNoMember
		}
		if s.take(m) {
			return got(m)
		}
		// A sampled member may be full while others are not; the least
		// loaded of all being full means every member is.
		if least := g.leastLoaded(except); least != nil && least != m && s.take(least) {
			return got(least)
		}
		if timer == nil {
			d := s.QueueTimeout
			if d <= 0 {
				d = DefaultQueueTimeout
			}
			timer = time.NewTimer(d)
			defer timer.Stop()
		}
		select {
		case <-g.freed:
		case <-timer.C:
			return nil, errBusy
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// take counts a request in flight on m if m is below its limit.
func (s *Server) take(m *member) bool {
	if n := m.inflight.Add(1); s.MaxRequestsPerMember <= 0 || n <= int64(s.MaxRequestsPerMember) {
		return true
	}
	m.inflight.Add(-1)
	return false
}

// registrationLimiter throttles registrations per remote IP address (per
// /64 for IPv6), so
// that one misbehaving client cannot keep the server busy with TLS
// handshakes and authentication calls. Addresses are forgotten after
// limiterIdle of silence; the table is bounded.
type registrationLimiter struct {
	mu       sync.Mutex
	limiters *simplelru.LRU[netip.Addr, *addrLimiter] // the least recently seen first
	every    rate.Limit
	burst    int
	now      func() time.Time // tests move time; nil is time.Now
}

// addrLimiter is the limit of one address, and when it was last asked.
type addrLimiter struct {
	*rate.Limiter
	seen time.Time
}

// Bounds of the registration limiter's table.
const (
	maxLimitedAddrs = 65536
	limiterIdle     = 10 * time.Minute
)

func newRegistrationLimiter(perSecond float64, burst int) *registrationLimiter {
	if burst < 1 {
		burst = max(1, int(perSecond))
	}
	limiters, err := simplelru.NewLRU[netip.Addr, *addrLimiter](maxLimitedAddrs, nil)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &registrationLimiter{
		limiters: limiters,
		every:    rate.Limit(perSecond),
		burst:    burst,
	}
}

func (l *registrationLimiter) allow(addr net.Addr) bool {
	ip, ok := host(addr)
	if !ok {
		return true
	}
	now := time.Now()
	if l.now != nil {
		now = l.now()
	}
	l.mu.Lock()
	// Silent addresses are forgotten here, the least recently seen first,
	// rather than by a goroutine of the table's own, which would outlive
	// the server.
	for {
		_, oldest, ok := l.limiters.GetOldest()
		if !ok || now.Sub(oldest.seen) < limiterIdle {
			break
		}
		l.limiters.RemoveOldest()
	}
	lim, ok := l.limiters.Get(ip)
	if !ok {
		lim = &addrLimiter{Limiter: rate.NewLimiter(l.every, l.burst)}
		l.limiters.Add(ip, lim)
	}
	lim.seen = now
	l.mu.Unlock()
	return lim.AllowN(now, 1)
}

// host returns the peer that addr belongs to, as limits count them: its IP
// address, or its /64 for IPv6, since one IPv6 host commonly holds a whole
// /64.
func host(addr net.Addr) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.Addr{}, false
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		ip = netip.PrefixFrom(ip, 64).Masked().Addr()
	}
	return ip, true
}

// Limits on data connections that have not shown a member's token yet.
// Anyone can open one, and each holds a goroutine, a TLS handshake and its
// buffers until its hello arrives or the register timeout passes.
const (
	maxPendingData        = 1024
	maxPendingDataPerHost = 64
)

// pendingData counts the data connections still in their hello, in all and
// per host, and refuses those over the limits: the first ones go on to
// their hello, later ones are closed at once. A member refused falls back
// to QUIC and dials again later. The zero value is ready to use.
type pendingData struct {
	mu     sync.Mutex
	total  int
	byHost map[netip.Addr]int
}

// enter counts a new connection from addr, or reports false if it is one
// too many.
func (p *pendingData) enter(addr net.Addr) bool {
	ip, _ := host(addr)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.total >= maxPendingData || p.byHost[ip] >= maxPendingDataPerHost {
		return false
	}
	if p.byHost == nil {
		p.byHost = map[netip.Addr]int{}
	}
	p.total++
	p.byHost[ip]++
	return true
}

// leave uncounts a connection that entered, its hello over.
func (p *pendingData) leave(addr net.Addr) {
	ip, _ := host(addr)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total--
	if p.byHost[ip]--; p.byHost[ip] <= 0 {
		delete(p.byHost, ip)
	}
}
