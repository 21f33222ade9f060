package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"golang.org/x/time/rate"
)

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

// registrationLimiter throttles registrations per remote IP address, so
// that one misbehaving client cannot keep the server busy with TLS
// handshakes and authentication calls. Addresses are forgotten after a
// while of silence; the table is bounded.
type registrationLimiter struct {
	mu       sync.Mutex
	limiters *expirable.LRU[netip.Addr, *rate.Limiter]
	every    rate.Limit
	burst    int
}

func newRegistrationLimiter(perSecond float64, burst int) *registrationLimiter {
	if burst < 1 {
		burst = max(1, int(perSecond))
	}
	return &registrationLimiter{
		limiters: expirable.NewLRU[netip.Addr, *rate.Limiter](65536, nil, 10*time.Minute),
		every:    rate.Limit(perSecond),
		burst:    burst,
	}
}

func (l *registrationLimiter) allow(addr net.Addr) bool {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return true
	}
	ip := ap.Addr().Unmap()
	l.mu.Lock()
	lim, ok := l.limiters.Get(ip)
	if !ok {
		lim = rate.NewLimiter(l.every, l.burst)
		l.limiters.Add(ip, lim)
	}
	l.mu.Unlock()
	return lim.Allow()
}
