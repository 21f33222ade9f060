package client

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/quic-go/quic-go"
)

// A Resolver looks up the IP addresses of a host name, as
// [net.Resolver.LookupNetIP] does; *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

const (
	// retireTimeout bounds the drain of a connection to an address that
	// no longer resolves, against a server that keeps it busy.
	retireTimeout = 30 * time.Second
	// kickInterval spaces the resolutions that connection failures ask
	// for, so that a replica down for long does not flood the resolver.
	kickInterval = time.Second
	// resolveTimeout bounds one lookup.
	resolveTimeout = 10 * time.Second
)

// A replicaSet is the supervisor behind one DialAndServe call: it resolves
// the tunnel server's host and keeps one dialLoop running per address.
type replicaSet struct {
	s        *Server
	addr     string // as given to DialAndServe
	host     string
	port     uint16
	tlsConf  *tls.Config
	quicConf *quic.Config
	log      *slog.Logger

	kick    chan struct{}                   // loops ask for an early resolution
	ended   chan loopEnd                    // loops report why they ended
	current map[netip.AddrPort]*replica     // the addresses that resolve now
	live    map[*replica]context.CancelFunc // every running loop, retiring ones too
}

// A replica is one address of the set and the signal that retires it.
type replica struct {
	addr   netip.AddrPort
	retire chan struct{} // closed when the address no longer resolves
}

func (r *replica) retired() bool {
	select {
	case <-r.retire:
		return true
	default:
		return false
	}
}

type loopEnd struct {
	r   *replica
	err error
}

// run supervises the loops until dialCtx is done (ctx done or the Server
// closed), then waits for them; or until one is refused permanently, then
// closes the others.
func (rs *replicaSet) run(ctx, dialCtx context.Context) error {
	rs.kick = make(chan struct{}, 1)
	rs.ended = make(chan loopEnd)
	rs.current = make(map[netip.AddrPort]*replica)
	rs.live = make(map[*replica]context.CancelFunc)

	// A nil channel never fires: an IP literal is never resolved.
	var resolveC <-chan time.Time
	var timer *time.Timer
	if ip, err := netip.ParseAddr(rs.host); err == nil {
		rs.update(ctx, []netip.Addr{ip})
	} else {
		timer = time.NewTimer(0)
		defer timer.Stop()
		resolveC = timer.C
	}

	var (
		failures    int
		lastErr     string
		next        time.Time // when timer fires
		lastResolve time.Time
	)
	for {
		select {
		case <-resolveC:
			lastResolve = time.Now()
			addrs, err := rs.resolve(dialCtx)
			if dialCtx.Err() != nil {
				continue // the Done case ends the loop
			}
			delay := rs.s.resolveInterval()
			if err != nil {
				limit := delay
				if len(rs.current) == 0 {
					// Nothing to dial, so no failing connection asks for
					// an early lookup: the lookup is the connection
					// attempt, and backs off like one, so that the tunnel
					// is up within about MaxBackoff of the name resolving
					// (replicas becoming ready), not ResolveInterval.
					limit = min(limit, rs.s.maxBackoff())
				}
				delay = backoff(rs.s.minBackoff(), limit, failures)
				failures++
				level := slog.LevelDebug
				if msg := err.Error(); msg != lastErr {
					level, lastErr = slog.LevelWarn, msg
				}
				rs.log.Log(ctx, level, "resolving tunnel address failed, retrying", "error", err, "attempt", failures, "retry_in", delay.Round(time.Millisecond))
			} else {
				failures, lastErr = 0, ""
				rs.update(ctx, addrs)
			}
			next = time.Now().Add(delay)
			timer.Reset(delay)

		case <-rs.kick:
			if timer == nil {
				continue
			}
			if at := lastResolve.Add(kickInterval); at.Before(next) {
				next = at
				timer.Reset(max(time.Until(at), 0))
			}

		case end := <-rs.ended:
			rs.live[end.r]()
			delete(rs.live, end.r)
			if end.err != nil && rs.s.permanent(end.err) {
				// Close the other connections at once: DialAndServe
				// reports the refusal and has nothing left to serve.
				for _, cancel := range rs.live {
					cancel()
				}
				rs.wait()
				return end.err
			}

		case <-dialCtx.Done():
			// After Shutdown the loops end once their connection has
			// drained; after ctx, at once.
			rs.wait()
			return rs.s.stopped(ctx)
		}
	}
}

// wait waits for every loop to end.
func (rs *replicaSet) wait() {
	for len(rs.live) > 0 {
		end := <-rs.ended
		rs.live[end.r]()
		delete(rs.live, end.r)
	}
}

// kickResolve asks for the host to be resolved again soon, after a
// connection failed: the replica may have moved to a new address.
func (rs *replicaSet) kickResolve() {
	select {
	case rs.kick <- struct{}{}:
	default:
	}
}

// resolve looks up the host's addresses to dial.
func (rs *replicaSet) resolve(ctx context.Context) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	addrs, err := rs.s.resolver().LookupNetIP(ctx, "ip", rs.host)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", rs.host, err)
	}
	addrs = dialable(addrs)
	if len(addrs) == 0 {
		return nil, fmt.Errorf("resolving %s: no addresses", rs.host)
	}
	return addrs, nil
}

// dialable returns the distinct addresses of addrs, sorted, IPv4-mapped
// ones unmapped, and only the IPv4 ones when there are any: a name with A
// and AAAA records usually names the same servers twice, and dialling
// both would register twice on each (or fail forever where IPv6 is not
// routed).
func dialable(addrs []netip.Addr) []netip.Addr {
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		switch a = a.Unmap(); {
		case a.Is4():
			v4 = append(v4, a)
		case a.Is6():
			v6 = append(v6, a)
		}
	}
	out := v4
	if len(out) == 0 {
		out = v6
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// update starts a loop for each new address and retires the loops of the
// addresses that are gone.
func (rs *replicaSet) update(ctx context.Context, addrs []netip.Addr) {
	want := make(map[netip.AddrPort]bool, len(addrs))
	for _, a := range addrs {
		want[netip.AddrPortFrom(a, rs.port)] = true
	}
	var added, removed []string
	for ap, r := range rs.current {
		if !want[ap] {
			close(r.retire)
			delete(rs.current, ap)
			removed = append(removed, ap.String())
		}
	}
	for ap := range want {
		if rs.current[ap] != nil {
			continue
		}
		r := &replica{addr: ap, retire: make(chan struct{})}
		loopCtx, cancel := context.WithCancel(ctx)
		rs.current[ap] = r
		rs.live[r] = cancel
		added = append(added, ap.String())
		go func() {
			rs.ended <- loopEnd{r: r, err: rs.s.dialLoop(loopCtx, rs, r)}
		}()
	}
	if len(added)+len(removed) == 0 {
		return
	}
	attrs := []any{"total", len(rs.current)}
	if len(added) > 0 {
		slices.Sort(added)
		attrs = append(attrs, "added", added)
	}
	if len(removed) > 0 {
		slices.Sort(removed)
		attrs = append(attrs, "removed", removed)
	}
	rs.log.Info("tunnel server addresses changed", attrs...)
}
