package tunnel

import (
	"context"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Authenticator decides whether a registration may join a group. It returns
// nil to allow, an error wrapping protocol.ErrUnauthorized to deny, and any
// other error when it cannot decide (the client is told to retry later).
type Authenticator interface {
	Authenticate(ctx context.Context, metadata map[string]string) error
}

// Group is the definition of a tunnel group as the server applies it.
type Group struct {
	// Name is what clients register with.
	Name string
	// Hosts are routed to the group, compared case-insensitively without port.
	Hosts []string
	// Auth admits registrations; nil admits everyone.
	Auth Authenticator
}

// table is an immutable routing table. A reload builds a new one and swaps
// it in; requests keep the table they looked up.
type table struct {
	byName map[string]*group
	byHost map[string]*group
	// bySuffix holds wildcard hosts: "*.example.com" as ".example.com".
	bySuffix map[string]*group
}

// lookupHost finds the group of a normalised host: an exact entry first,
// then the most specific wildcard.
func (t *table) lookupHost(host string) *group {
	if t == nil {
		return nil
	}
	if g, ok := t.byHost[host]; ok {
		return g
	}
	if len(t.bySuffix) == 0 {
		return nil
	}
	for i := strings.IndexByte(host, '.'); i >= 0; {
		if g, ok := t.bySuffix[host[i:]]; ok {
			return g
		}
		j := strings.IndexByte(host[i+1:], '.')
		if j < 0 {
			break
		}
		i += 1 + j
	}
	return nil
}

func (t *table) lookupName(name string) *group {
	if t == nil {
		return nil
	}
	return t.byName[name]
}

// group is the live state of a tunnel group: it outlives routing tables, so
// that a reload that keeps a group keeps its members.
type group struct {
	name  string
	auth  atomic.Pointer[authBox]
	hosts atomic.Pointer[[]string]

	mu sync.Mutex
	// removed is set under mu, so that add sees it; it is read without
	// mu by every request's metrics.
	removed atomic.Bool
	// members is copied on write so that the balancer reads it without locks.
	members atomic.Pointer[[]*member]
	next    atomic.Uint32
	// freed wakes one request waiting for a member below its limit.
	freed chan struct{}
}

// authBox lets a nil Authenticator live behind an atomic.Pointer.
type authBox struct{ Authenticator }

func (s *Server) newGroup(name string) *group {
	g := &group{name: name, freed: make(chan struct{}, 1)}
	g.members.Store(&[]*member{})
	return g
}

func (g *group) authenticator() Authenticator {
	if b := g.auth.Load(); b != nil {
		return b.Authenticator
	}
	return nil
}

// add makes m a member unless the group was removed meanwhile.
func (g *group) add(m *member) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.removed.Load() {
		return false
	}
	ms := append(slices.Clone(*g.members.Load()), m)
	g.members.Store(&ms)
	// Requests queued behind full members may take this one.
	g.wake()
	return true
}

// remove drops m; it reports whether m was a member.
func (g *group) remove(m *member) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	old := *g.members.Load()
	i := slices.Index(old, m)
	if i < 0 {
		return false
	}
	ms := slices.Delete(slices.Clone(old), i, i+1)
	g.members.Store(&ms)
	return true
}

// retire marks the group removed and returns its members, which the caller
// closes.
func (g *group) retire() []*member {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.removed.Store(true)
	ms := *g.members.Load()
	g.members.Store(&[]*member{})
	return ms
}

func (g *group) size() int { return len(*g.members.Load()) }

func (g *group) isRemoved() bool { return g.removed.Load() }

// pick chooses the live member with the fewest requests in flight, skipping
// except. Small groups are scanned whole (see leastLoaded); large ones use
// the power of two choices, which is nearly as good and constant time.
func (g *group) pick(except *member) *member {
	ms := *g.members.Load()
	if n := len(ms); n > 8 {
		for range 4 {
			a, b := ms[rand.IntN(n)], ms[rand.IntN(n)]
			if b.inflight.Load() < a.inflight.Load() {
				a, b = b, a
			}
			for _, c := range []*member{a, b} {
				if c != except && c.usable() {
					return c
				}
			}
		}
	}
	return g.leastLoaded(except)
}

// leastLoaded scans every member for the live one with the fewest requests
// in flight, skipping except. The scan starts at a rotating position, so
// that ties (an idle group) spread round-robin.
func (g *group) leastLoaded(except *member) *member {
	ms := *g.members.Load()
	n := len(ms)
	if n == 0 {
		return nil
	}
	// Modulo before the conversion: on 32-bit platforms int(uint32) turns
	// negative past 2^31 picks.
	start := int(g.next.Add(1) % uint32(n))
	var best *member
	var bestLoad int64
	for i := range n {
		m := ms[(start+i)%n]
		if m == except || !m.usable() {
			continue
		}
		if load := m.inflight.Load(); best == nil || load < bestLoad {
			best, bestLoad = m, load
		}
	}
	return best
}

// release ends a request on m and wakes a waiting one.
func (g *group) release(m *member) {
	m.inflight.Add(-1)
	g.wake()
}

// wake tells one request waiting for a member below its limit to look
// again.
func (g *group) wake() {
	select {
	case g.freed <- struct{}{}:
	default:
	}
}

// member is one registered tunnel connection.
type member struct {
	conn     *quic.Conn
	cc       *http3.ClientConn
	remote   net.Addr
	since    time.Time
	inflight atomic.Int64
	draining atomic.Bool
	// token admits the member's data connections to data.
	token string
	data  dataPool
}

func (m *member) usable() bool {
	return !m.draining.Load() && m.conn.Context().Err() == nil
}
