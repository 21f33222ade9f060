package app

import (
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"sync/atomic"
	"time"
)

// The server's parallelism follows its load: one P (GOMAXPROCS=1) while
// one is enough, the runtime's default (every core, or the container's
// quota) as soon as it is not.
//
// With a second P idle, each goroutine a request makes runnable has the
// runtime wake a thread to run it; net/http alone starts one per request,
// to watch the connection, and wakes it again at the end. That is a futex
// call, an interrupt to another core, and a thread spinning there while
// the member and the visitor wait for that core: on a 2-core VM, 30 to
// 40 µs of each request through the tunnel while the server is lightly
// loaded, a quarter of what the tunnel adds. One P is enough while the
// process uses little CPU, or while its requests come one at a time
// (none can wait for another's P), short of saturating it.
const (
	governInterval = 100 * time.Millisecond
	// An interval is quiet under governLow cores, or under
	// governSequential when at most one request in ten overlapped
	// another; governQuiet quiet intervals in a row bring one P.
	governLow        = 0.4
	governSequential = 0.85
	governQuiet      = 20
	// An interval is busy over governHigh cores with requests that
	// overlap, or over governFull cores at all: every P comes back at
	// once.
	governHigh = 0.5
	governFull = 0.9
)

// procGovernor decides, interval by interval, between one P and the
// runtime's default.
type procGovernor struct {
	set    func(single bool) // applies a decision
	single bool
	quiet  int // quiet intervals in a row
}

// observe takes what an interval saw: the CPU the process used, in cores,
// the requests (see loadMeter.take), and how many of them overlapped
// another. Work outside requests (registrations, handshakes) counts as
// sequential: it gets every P back over governFull.
func (g *procGovernor) observe(cores float64, started, overlapping uint64) {
	sequential := overlapping*10 <= started
	if g.single {
		if cores > governFull || cores > governHigh && !sequential {
			g.single = false
			g.set(false)
		}
		return
	}
	if cores >= governLow && !(sequential && cores < governSequential) {
		g.quiet = 0
		return
	}
	if g.quiet++; g.quiet >= governQuiet {
		g.single, g.quiet = true, 0
		g.set(true)
	}
}

// loadMeter counts the requests a handler takes, and those that start
// while another is in flight or stay in flight with others.
type loadMeter struct {
	inFlight             atomic.Int64
	started, overlapping atomic.Uint64
}

func (m *loadMeter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.started.Add(1)
		if m.inFlight.Add(1) > 1 {
			m.overlapping.Add(1)
		}
		defer m.inFlight.Add(-1)
		h.ServeHTTP(w, r)
	})
}

// take returns the counts since the last take. Requests still in flight
// together count as well, as overlapping: long ones (a download, a
// stream, a WebSocket) start in one interval and load many.
func (m *loadMeter) take() (started, overlapping uint64) {
	started, overlapping = m.started.Swap(0), m.overlapping.Swap(0)
	if n := m.inFlight.Load(); n > 1 {
		started += uint64(n)
		overlapping += uint64(n - 1)
	}
	return started, overlapping
}

// governParallelism starts following the load of the requests m counts
// with GOMAXPROCS, unless the operator set GOMAXPROCS or the process has a
// single P anyway; the function it returns stops that and restores the
// default.
func governParallelism(m *loadMeter, logger *slog.Logger) (stop func()) {
	if _, set := os.LookupEnv("GOMAXPROCS"); set || runtime.GOMAXPROCS(0) == 1 {
		return func() {}
	}
	if _, ok := processCPU(); !ok {
		return func() {}
	}
	g := &procGovernor{set: func(single bool) {
		if single {
			runtime.GOMAXPROCS(1)
		} else {
			// The default, which the runtime then keeps following (a
			// container's CPU quota changed).
			runtime.SetDefaultGOMAXPROCS()
		}
		logger.Debug("parallelism follows the load", "gomaxprocs", runtime.GOMAXPROCS(0))
	}}
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		tick := time.NewTicker(governInterval)
		defer tick.Stop()
		last, _ := processCPU()
		lastAt := time.Now()
		m.take()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				// Read when the goroutine runs, not when the tick was
				// due: on a saturated P the two differ.
				cpu, _ := processCPU()
				now := time.Now()
				started, overlapping := m.take()
				g.observe((cpu-last).Seconds()/now.Sub(lastAt).Seconds(), started, overlapping)
				last, lastAt = cpu, now
			}
		}
	}()
	return func() {
		close(done)
		<-exited
		if g.single {
			runtime.SetDefaultGOMAXPROCS()
		}
	}
}
