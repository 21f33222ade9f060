package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// cpuSample is the CPU time of the three processes on the data path.
type cpuSample struct{ server, member, loadgen time.Duration }

func (a cpuSample) sub(b cpuSample) cpuSample {
	return cpuSample{a.server - b.server, a.member - b.member, a.loadgen - b.loadgen}
}

// run is one measured throughput run and what it cost.
type run struct {
	load loadResult
	cpu  cpuSample
}

// round holds one direct/tunnel pair of every measurement, and the
// reference hops' latencies.
type round struct {
	small, big [2]run // [direct, tunnel]
	lat        [4]latencyResult
}

const (
	direct = 0
	tunnel = 1
	relay  = 2 // latency only: a bare TCP relay
	proxy  = 3 // latency only: httputil.ReverseProxy
)

// bench runs the whole benchmark and returns its report.
func bench(ctx context.Context, cfg *config, log *slog.Logger) (*report, error) {
	dir, err := os.MkdirTemp("", "reverst-bench-")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if ok {
			_ = os.RemoveAll(dir)
		} else {
			log.Info("kept the logs of the failed run", "dir", dir)
		}
	}()
	f, err := writeFiles(dir)
	if err != nil {
		return nil, err
	}
	bin := cfg.reverstBin
	if bin == "" {
		log.Info("building cmd/reverst")
		if bin, err = buildReverst(ctx, dir); err != nil {
			return nil, err
		}
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	rep := &report{cfg: cfg}

	if err := measureLoad(ctx, cfg, log, f, bin, self, rep); err != nil {
		return nil, err
	}
	if cfg.idle > 0 {
		if err := measureIdle(ctx, cfg, log, f, bin, self, rep); err != nil {
			return nil, err
		}
	}
	rep.notes = logNotes(dir)
	ok = true
	return rep, nil
}

// measureLoad runs the alternating direct/tunnel rounds.
func measureLoad(ctx context.Context, cfg *config, log *slog.Logger, f *files, bin, self string, rep *report) error {
	var serverProfile, memberProfile string
	if cfg.profileDir != "" {
		if err := os.MkdirAll(cfg.profileDir, 0o755); err != nil {
			return err
		}
		dir, err := filepath.Abs(cfg.profileDir)
		if err != nil {
			return err
		}
		serverProfile, memberProfile = filepath.Join(dir, "server.pprof"), filepath.Join(dir, "member.pprof")
	}
	srv, err := startServer(ctx, "server", bin, f, cfg.serverEnv, serverProfile)
	if err != nil {
		return err
	}
	defer srv.stop()
	env := []string{roleEnv + "=member"}
	if memberProfile != "" {
		env = append(env, cpuProfileEnv+"="+memberProfile)
	}
	mem, err := startProc("member", filepath.Join(f.dir, "member.log"), env, self,
		"-tunnel", srv.tunnelAddr, "-group", benchGroup, "-n", strconv.Itoa(cfg.members), "-ca", f.cert,
		"-backend", "-small-size", strconv.Itoa(cfg.smallSize), "-big-size", strconv.Itoa(cfg.bigSize),
		"-quic-only="+strconv.FormatBool(cfg.quicOnly))
	if err != nil {
		return err
	}
	defer mem.stop()
	backendAddr, err := mem.expect(ctx, "backend ", 10*time.Second)
	if err != nil {
		return err
	}
	if _, err := mem.expect(ctx, "ready ", 30*time.Second); err != nil {
		return err
	}
	if err := srv.waitMembers(ctx, benchGroup, cfg.members, 10*time.Second); err != nil {
		return err
	}
	var stops []func()
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()
	// The reference hops, in front of the backend.
	hop := func(name string, args ...string) (string, error) {
		p, err := startProc(name, filepath.Join(f.dir, name+".log"), []string{roleEnv + "=relay"}, self, append([]string{"-target", backendAddr}, args...)...)
		if err != nil {
			return "", err
		}
		stops = append(stops, p.stop)
		return p.expect(ctx, "relay ", 10*time.Second)
	}
	relayAddr, err := hop("relay")
	if err != nil {
		return err
	}
	proxyAddr, err := hop("proxy", "-http")
	if err != nil {
		return err
	}

	targets := [4]target{
		{name: "direct", base: "http://" + backendAddr},
		{name: "tunnel", base: "http://" + srv.httpAddr, host: benchHost},
		{name: "relay", base: "http://" + relayAddr},
		{name: "proxy", base: "http://" + proxyAddr},
	}
	smallTr := [2]*http.Transport{newTransport(cfg.concurrency), newTransport(cfg.concurrency)}
	bigTr := [2]*http.Transport{newTransport(cfg.bigConcurrency), newTransport(cfg.bigConcurrency)}
	sample := func() (cpuSample, error) {
		var s cpuSample
		var e1, e2, e3 error
		s.server, e1 = cpuTime(srv.pid())
		s.member, e2 = cpuTime(mem.pid())
		s.loadgen, e3 = cpuTime("self")
		for _, e := range []error{e1, e2, e3} {
			if e != nil {
				return s, e
			}
		}
		return s, nil
	}
	measure := func(i int, tr *http.Transport, path string, want int64, conc int, d time.Duration) (run, error) {
		t := targets[i]
		if cfg.warmup > 0 {
			if _, err := throughput(ctx, tr, t, path, want, conc, cfg.warmup); err != nil {
				return run{}, fmt.Errorf("warm-up: %w", err)
			}
		}
		before, err := sample()
		if err != nil {
			return run{}, err
		}
		res, err := throughput(ctx, tr, t, path, want, conc, d)
		if err != nil {
			return run{}, err
		}
		after, err := sample()
		if err != nil {
			return run{}, err
		}
		return run{load: res, cpu: after.sub(before)}, nil
	}

	for r := range cfg.rounds {
		// ABBA order, so that a drift over the run favours neither side.
		order := []int{direct, tunnel}
		if r%2 == 1 {
			order = []int{tunnel, direct}
		}
		var rd round
		for _, i := range order {
			if rd.small[i], err = measure(i, smallTr[i], pathSmall, int64(cfg.smallSize), cfg.concurrency, cfg.smallDur); err != nil {
				return err
			}
		}
		for _, i := range order {
			if rd.big[i], err = measure(i, bigTr[i], pathBig, int64(cfg.bigSize), cfg.bigConcurrency, cfg.bigDur); err != nil {
				return err
			}
		}
		// The reference hops take their turns between the two.
		turns := []int{order[0], relay, proxy, order[1]}
		var ts []target
		for _, i := range turns {
			ts = append(ts, targets[i])
		}
		lat, err := latencies(ctx, ts, pathSmall, int64(cfg.smallSize), cfg.warmup, cfg.latDur)
		if err != nil {
			return err
		}
		for k, i := range turns {
			rd.lat[i] = lat[k]
		}
		log.Info("round done", "round", r+1, "of", cfg.rounds,
			"small_req_s", fmt.Sprintf("%.0f/%.0f", rd.small[direct].load.reqPerSec(), rd.small[tunnel].load.reqPerSec()),
			"big_mib_s", fmt.Sprintf("%.0f/%.0f", rd.big[direct].load.mibPerSec(), rd.big[tunnel].load.mibPerSec()),
			"p50_ms", fmt.Sprintf("%.3f/%.3f (relay %.3f, proxy %.3f)", ms(rd.lat[direct].p50), ms(rd.lat[tunnel].p50), ms(rd.lat[relay].p50), ms(rd.lat[proxy].p50)))
		rep.rounds = append(rep.rounds, rd)
	}
	for _, tr := range append(smallTr[:], bigTr[:]...) {
		tr.CloseIdleConnections()
	}
	if rep.serverMem, err = readMemory(srv.pid()); err != nil {
		return err
	}
	if rep.memberMem, err = readMemory(mem.pid()); err != nil {
		return err
	}
	if rep.loadgenMem, err = readMemory("self"); err != nil {
		return err
	}
	return nil
}

// measureIdle registers cfg.idle tunnels with a fresh server and measures
// what they cost it at rest.
func measureIdle(ctx context.Context, cfg *config, log *slog.Logger, f *files, bin, self string, rep *report) error {
	profile := ""
	if cfg.profileDir != "" {
		profile = filepath.Join(cfg.profileDir, "idle-server.pprof")
	}
	srv, err := startServer(ctx, "idle-server", bin, f, cfg.serverEnv, profile)
	if err != nil {
		return err
	}
	defer srv.stop()
	settle := 2 * time.Second
	if cfg.latDur < time.Second {
		settle = time.Second
	}
	time.Sleep(settle / 2)
	if rep.idle.base, err = readMemory(srv.pid()); err != nil {
		return err
	}
	if rep.idle.baseRuntime, err = srv.metrics(runtimeSeries...); err != nil {
		return err
	}

	log.Info("registering idle tunnels", "n", cfg.idle)
	start := time.Now()
	p, err := startProc("idle-members", filepath.Join(f.dir, "idle-members.log"), []string{roleEnv + "=member"}, self,
		"-tunnel", srv.tunnelAddr, "-group", idleGroup, "-n", strconv.Itoa(cfg.idle), "-ca", f.cert,
		"-quic-only="+strconv.FormatBool(cfg.quicOnly))
	if err != nil {
		return err
	}
	defer p.stop()
	if _, err := p.expect(ctx, "ready ", 2*time.Minute); err != nil {
		return err
	}
	if err := srv.waitMembers(ctx, idleGroup, cfg.idle, 30*time.Second); err != nil {
		return err
	}
	rep.idle.registerTime = time.Since(start)

	// Let the registration burst's garbage be collected, and measure the
	// CPU the idle tunnels cost meanwhile (keep-alives).
	cpu0, err := cpuTime(srv.pid())
	if err != nil {
		return err
	}
	t0 := time.Now()
	time.Sleep(settle)
	cpu1, err := cpuTime(srv.pid())
	if err != nil {
		return err
	}
	rep.idle.cpuShare = float64(cpu1-cpu0) / float64(time.Since(t0))
	if rep.idle.loaded, err = readMemory(srv.pid()); err != nil {
		return err
	}
	if rep.idle.loadedRuntime, err = srv.metrics(runtimeSeries...); err != nil {
		return err
	}
	if rep.idle.members, err = readMemory(p.pid()); err != nil {
		return err
	}
	rep.idle.n = cfg.idle
	if profile != "" {
		return srv.saveHeapProfile(filepath.Join(cfg.profileDir, "idle-server.heap.pprof"))
	}
	return nil
}

// logNotes returns the lines of the children's logs that matter for the
// numbers: quic-go's warning about UDP buffer sizes, and errors.
func logNotes(dir string) []string {
	var notes []string
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		seen := map[string]bool{}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.Contains(line, "buffer size") && !strings.Contains(line, "level=ERROR") {
				continue
			}
			if len(line) > 240 {
				line = line[:240] + "…"
			}
			if !seen[line] {
				seen[line] = true
				notes = append(notes, filepath.Base(path)+": "+line)
			}
		}
	}
	return notes
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
