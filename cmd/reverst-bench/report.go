package main

import (
	"fmt"
	"io"
	"runtime"
	"slices"
	"text/tabwriter"
	"time"
)

// Goals of issue 6, as ratios to direct measured in the same run.
const (
	goalSmallRatio = 0.34
	goalBigRatio   = 0.16
	goalAddedP50   = 0.15 // ms
)

// report is everything bench measured.
type report struct {
	cfg        *config
	rounds     []round
	serverMem  memory // after the load rounds
	memberMem  memory
	loadgenMem memory
	idle       struct {
		n            int
		base, loaded memory // server with 0 and n tunnels
		members      memory // the process holding the n registrations
		// go_* samples of the server's metrics with 0 and n tunnels
		baseRuntime, loadedRuntime map[string]float64
		cpuShare                   float64
		registerTime               time.Duration
	}
	notes []string
}

// stat is min, median and max of a series.
type stat struct{ min, med, max float64 }

func summarize(xs []float64) stat {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return stat{}
	}
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return stat{s[0], med, s[n-1]}
}

func (s stat) format(prec int) string {
	return fmt.Sprintf("%.*f / %.*f / %.*f", prec, s.min, prec, s.med, prec, s.max)
}

// series extracts one value per round.
func (r *report) series(f func(round) float64) []float64 {
	out := make([]float64, len(r.rounds))
	for i, rd := range r.rounds {
		out[i] = f(rd)
	}
	return out
}

// Summaries used by the table and the goals.
func (r *report) smallRate(i int) stat {
	return summarize(r.series(func(rd round) float64 { return rd.small[i].load.reqPerSec() }))
}

func (r *report) bigRate(i int) stat {
	return summarize(r.series(func(rd round) float64 { return rd.big[i].load.mibPerSec() }))
}

func (r *report) smallRatio() stat {
	return summarize(r.series(func(rd round) float64 {
		return rd.small[tunnel].load.reqPerSec() / rd.small[direct].load.reqPerSec()
	}))
}

func (r *report) bigRatio() stat {
	return summarize(r.series(func(rd round) float64 {
		return rd.big[tunnel].load.mibPerSec() / rd.big[direct].load.mibPerSec()
	}))
}

// added is the p50 latency target i adds to direct.
func (r *report) added(i int) stat {
	return summarize(r.series(func(rd round) float64 { return ms(rd.lat[i].p50) - ms(rd.lat[direct].p50) }))
}

// cpuRatio is, per round, the CPU all processes spent per request (or
// per MiB) directly divided by the same through the tunnel.
func (r *report) cpuRatio(big bool) stat {
	return summarize(r.series(func(rd round) float64 {
		runs := rd.small
		if big {
			runs = rd.big
		}
		cost := func(x run) float64 {
			total := float64(x.cpu.server + x.cpu.member + x.cpu.loadgen)
			if big {
				return total / float64(x.load.bytes)
			}
			return total / float64(x.load.reqs)
		}
		return cost(runs[direct]) / cost(runs[tunnel])
	}))
}

// perReq is CPU microseconds per request of one process in a run.
func perReq(cpu time.Duration, reqs int64) float64 {
	if reqs == 0 {
		return 0
	}
	return float64(cpu) / float64(time.Microsecond) / float64(reqs)
}

// perMiB is CPU milliseconds per MiB transferred in a run.
func perMiB(cpu time.Duration, bytes int64) float64 {
	if bytes == 0 {
		return 0
	}
	return float64(cpu) / float64(time.Millisecond) / (float64(bytes) / (1 << 20))
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

// write prints the report as tables.
func (r *report) write(out io.Writer) {
	c := r.cfg
	transport := "data connections"
	if c.quicOnly {
		transport = "QUIC only"
	}
	fmt.Fprintf(out, "reverst-bench: %d rounds (direct/tunnel alternated), small body %d B at %d connections, %s body at %d connections, %d tunnel members (%s), %d CPUs, %s\n",
		c.rounds, c.smallSize, c.concurrency, mib(int64(c.bigSize)), c.bigConcurrency, c.members, transport, runtime.NumCPU(), runtime.Version())
	fmt.Fprintf(out, "runs: small %s, large %s, latency %s per target in turns of %d requests, warm-up %s; every figure is min / median / max over the rounds\n\n", c.smallDur, c.bigDur, c.latDur, latencyTurn, c.warmup)

	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "measurement\tdirect\ttunnel\ttunnel/direct\n")
	row := func(name string, f func(i int) stat, prec int, ratio string) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, f(direct).format(prec), f(tunnel).format(prec), ratio)
	}
	row("small req/s", r.smallRate, 0, r.smallRatio().format(3))
	row(fmt.Sprintf("%s MiB/s", mib(int64(c.bigSize))), r.bigRate, 0, r.bigRatio().format(3))
	row("sequential p50 ms", func(i int) stat {
		return summarize(r.series(func(rd round) float64 { return ms(rd.lat[i].p50) }))
	}, 3, "added "+r.added(tunnel).format(3)+" ms")
	row("sequential p99 ms", func(i int) stat {
		return summarize(r.series(func(rd round) float64 { return ms(rd.lat[i].p99) }))
	}, 3, "added "+summarize(r.series(func(rd round) float64 { return ms(rd.lat[tunnel].p99) - ms(rd.lat[direct].p99) })).format(3)+" ms")
	for _, ref := range []struct {
		i    int
		name string
	}{{relay, "a bare TCP relay process"}, {proxy, "httputil.ReverseProxy"}} {
		fmt.Fprintf(tw, "sequential p50 ms through %s\t\t%s\tadded %s ms\n", ref.name,
			summarize(r.series(func(rd round) float64 { return ms(rd.lat[ref.i].p50) })).format(3), r.added(ref.i).format(3))
	}
	cpuRow := func(name string, pick func(cpuSample) time.Duration, big bool) {
		row(name, func(i int) stat {
			return summarize(r.series(func(rd round) float64 {
				if big {
					return perMiB(pick(rd.big[i].cpu), rd.big[i].load.bytes)
				}
				return perReq(pick(rd.small[i].cpu), rd.small[i].load.reqs)
			}))
		}, 1, "")
	}
	cpuRow("CPU µs/req small: server", func(s cpuSample) time.Duration { return s.server }, false)
	cpuRow("CPU µs/req small: member", func(s cpuSample) time.Duration { return s.member }, false)
	cpuRow("CPU µs/req small: load gen", func(s cpuSample) time.Duration { return s.loadgen }, false)
	cpuRow("CPU µs/req small: all three", func(s cpuSample) time.Duration { return s.server + s.member + s.loadgen }, false)
	cpuRow("CPU ms/MiB large: server", func(s cpuSample) time.Duration { return s.server }, true)
	cpuRow("CPU ms/MiB large: member", func(s cpuSample) time.Duration { return s.member }, true)
	cpuRow("CPU ms/MiB large: load gen", func(s cpuSample) time.Duration { return s.loadgen }, true)
	cpuRow("CPU ms/MiB large: all three", func(s cpuSample) time.Duration { return s.server + s.member + s.loadgen }, true)
	// On a saturated machine the throughput ratio tends to the inverse
	// ratio of the CPU each request costs: a figure much less sensitive
	// to other load on the machine than the rates themselves.
	fmt.Fprintf(tw, "CPU-bound ratio small (direct CPU/req / tunnel CPU/req)\t\t\t%s\n", r.cpuRatio(false).format(3))
	fmt.Fprintf(tw, "CPU-bound ratio large (same, per MiB)\t\t\t%s\n", r.cpuRatio(true).format(3))
	var failed [2]int64
	for _, rd := range r.rounds {
		for i := range failed {
			failed[i] += rd.small[i].load.failed + rd.big[i].load.failed
		}
	}
	fmt.Fprintf(tw, "failed requests\t%d\t%d\t\n", failed[direct], failed[tunnel])
	_ = tw.Flush()

	fmt.Fprintf(out, "\nmemory\n")
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "tunnel server peak RSS (VmHWM) after the load rounds\t%s\t(RSS now %s)\n", mib(r.serverMem.hwm), mib(r.serverMem.rss))
	fmt.Fprintf(tw, "member process peak RSS (backend + %d tunnels)\t%s\t\n", c.members, mib(r.memberMem.hwm))
	fmt.Fprintf(tw, "load generator peak RSS\t%s\t\n", mib(r.loadgenMem.hwm))
	if n := r.idle.n; n > 0 {
		per := float64(r.idle.loaded.rss-r.idle.base.rss) / float64(n) / 1024
		fmt.Fprintf(tw, "fresh tunnel server RSS, no tunnel\t%s\t\n", mib(r.idle.base.rss))
		fmt.Fprintf(tw, "same server RSS with %d idle tunnels\t%s\t(+%.1f KiB per tunnel; peak %s)\n", n, mib(r.idle.loaded.rss), per, mib(r.idle.loaded.hwm))
		delta := func(name string) float64 { return (r.idle.loadedRuntime[name] - r.idle.baseRuntime[name]) / float64(n) }
		fmt.Fprintf(tw, "  of which, per tunnel\t%.1f goroutines, %.1f KiB heap in use, %.1f KiB stacks\t\n",
			delta("go_goroutines"), delta("go_memstats_heap_inuse_bytes")/1024, delta("go_memstats_stack_inuse_bytes")/1024)
		fmt.Fprintf(tw, "its CPU with %d idle tunnels\t%.1f%% of a core\t\n", n, 100*r.idle.cpuShare)
		fmt.Fprintf(tw, "client process RSS holding %d tunnels\t%s\t(%.1f KiB per tunnel)\n", n, mib(r.idle.members.rss), float64(r.idle.members.rss)/float64(n)/1024)
		fmt.Fprintf(tw, "time to register %d tunnels\t%s\t\n", n, r.idle.registerTime.Round(time.Millisecond))
	}
	_ = tw.Flush()

	fmt.Fprintf(out, "\ngoals (median over the rounds of the per-round tunnel/direct figure)\n")
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	small, big, added := r.smallRatio().med, r.bigRatio().med, r.added(tunnel).med
	fmt.Fprintf(tw, "small-body req/s\t>= %.2f of direct\t%.3f\t%s\n", goalSmallRatio, small, verdict(small >= goalSmallRatio))
	fmt.Fprintf(tw, "%s MiB/s\t>= %.2f of direct\t%.3f\t%s\n", mib(int64(c.bigSize)), goalBigRatio, big, verdict(big >= goalBigRatio))
	fmt.Fprintf(tw, "added p50 latency\t<= %.2f ms\t%.3f ms\t%s\t(here a bare TCP relay process adds %.3f ms, httputil.ReverseProxy %.3f ms)\n",
		goalAddedP50, added, verdict(added <= goalAddedP50), r.added(relay).med, r.added(proxy).med)
	_ = tw.Flush()

	if len(r.notes) > 0 {
		fmt.Fprintf(out, "\nnotes from the processes' logs\n")
		for _, n := range r.notes {
			fmt.Fprintf(out, "  %s\n", n)
		}
	}
}
