// Command reverst-bench measures reverst's data path on loopback against a
// direct connection to the same backend, in the same run.
//
//	go run ./cmd/reverst-bench          # about 1.5 minutes on 2 cores
//	go run ./cmd/reverst-bench -quick   # about 20 s, building included
//
// It builds ./cmd/reverst and starts it as a separate process, with a
// generated certificate and groups file, so that the server's CPU time
// and memory can be read from /proc. The tunnel members run in another
// process (this binary re-executed in its "member" role): one process
// serves the same handler both over plain HTTP/1.1 (the "direct" baseline)
// and through N client.Server registrations (the "tunnel" path). The load
// generator runs in this process. Direct and tunnel runs alternate, and
// each measurement is repeated; the report gives min/median/max and the
// tunnel/direct ratio of each round, against the project's goals.
//
// The latency rounds also measure the backend through two reference hops:
// a bare TCP relay process, what any extra process in the path costs on
// this machine, and the standard library's httputil.ReverseProxy, what an
// idiomatic Go HTTP proxy costs. The four targets of a latency round
// (direct, tunnel and the two hops) take turns of 50 sequential requests,
// each on its own connection, so that all see the same machine.
//
// A second, fresh server then takes 1,000 idle registrations from a third
// process, to measure the memory a tunnel costs.
//
// With -profile DIR the tunnel server runs as this binary in its "server"
// role (the same app.Main as cmd/reverst) and both the server and the
// members write CPU profiles into DIR.
//
// The process exits 0 whether or not the goals are met: it is a
// measurement. It exits 1 when the measurement itself failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// roleEnv selects the role of a re-executed bench binary. An environment
// variable rather than an argument, so that the test binary can take roles
// too without its own flags getting in the way.
const roleEnv = "REVERST_BENCH_ROLE"

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// realMain dispatches on the role and returns the exit status.
func realMain(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	var err error
	switch role := os.Getenv(roleEnv); role {
	case "":
		var cfg *config
		cfg, err = parseConfig(args, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "reverst-bench: %v\n", err)
			return 2
		}
		var rep *report
		rep, err = bench(ctx, cfg, log)
		if err == nil {
			rep.write(stdout)
		}
	case "member":
		err = memberMain(ctx, args, stdout, log)
	case "server":
		err = serverMain(ctx, args, stdout, stderr)
	case "relay":
		err = relayMain(ctx, args, stdout)
	default:
		err = fmt.Errorf("unknown %s %q", roleEnv, role)
	}
	if err != nil {
		log.Error("reverst-bench failed", "error", err)
		return 1
	}
	return 0
}

// config is the benchmark's settings.
type config struct {
	rounds         int
	concurrency    int // small bodies
	bigConcurrency int // 1 MiB bodies
	smallSize      int
	bigSize        int
	smallDur       time.Duration
	bigDur         time.Duration
	latDur         time.Duration
	warmup         time.Duration
	members        int
	idle           int
	profileDir     string
	reverstBin     string
	serverEnv      stringList
	quicOnly       bool
}

type stringList []string

func (l *stringList) String() string     { return fmt.Sprint(*l) }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func parseConfig(args []string, out io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("reverst-bench", flag.ContinueOnError)
	fs.SetOutput(out)
	quick := fs.Bool("quick", false, "short run of about 20 s (shorter durations and 2 rounds, unless set explicitly)")
	fs.IntVar(&c.rounds, "rounds", 3, "repetitions of each direct/tunnel pair")
	fs.IntVar(&c.concurrency, "c", 64, "concurrent keep-alive connections for small bodies")
	fs.IntVar(&c.bigConcurrency, "big-c", 4, "concurrent keep-alive connections for 1 MiB bodies")
	fs.IntVar(&c.smallSize, "small-size", 100, "small response body size in bytes")
	fs.IntVar(&c.bigSize, "big-size", 1<<20, "large response body size in bytes")
	fs.DurationVar(&c.smallDur, "small", 4*time.Second, "duration of each small-body run")
	fs.DurationVar(&c.bigDur, "big", 4*time.Second, "duration of each large-body run")
	fs.DurationVar(&c.latDur, "lat", 2*time.Second, "time each target gets in a latency round (the four take turns)")
	fs.DurationVar(&c.warmup, "warmup", 500*time.Millisecond, "unmeasured warm-up before each run")
	fs.IntVar(&c.members, "members", 2, "tunnel members (client.Server registrations) serving the load")
	fs.IntVar(&c.idle, "idle", 1000, "idle tunnels registered for the memory measurement (0 skips it)")
	fs.StringVar(&c.profileDir, "profile", "", "write CPU and allocation profiles of the server and the members (server.pprof, member.pprof, *.allocs.pprof) into this directory")
	fs.StringVar(&c.reverstBin, "reverst", "", "use this reverst binary instead of building ./cmd/reverst")
	fs.BoolVar(&c.quicOnly, "quic-only", false, "members carry every request over QUIC, without data connections")
	fs.Var(&c.serverEnv, "server-env", "extra KEY=VALUE environment for the tunnel server, e.g. GOGC=200 (repeatable)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quickDefaults := map[string]func(){
			"rounds": func() { c.rounds = 2 },
			"small":  func() { c.smallDur = 750 * time.Millisecond },
			"big":    func() { c.bigDur = 750 * time.Millisecond },
			"lat":    func() { c.latDur = 400 * time.Millisecond },
			"warmup": func() { c.warmup = 150 * time.Millisecond },
		}
		for name, apply := range quickDefaults {
			if !set[name] {
				apply()
			}
		}
	}
	switch {
	case c.rounds < 1, c.concurrency < 1, c.bigConcurrency < 1, c.members < 1, c.idle < 0:
		return nil, errors.New("-rounds, -c, -big-c and -members must be at least 1, -idle at least 0")
	case c.smallDur <= 0, c.bigDur <= 0, c.latDur <= 0, c.warmup < 0:
		return nil, errors.New("durations must be positive")
	case c.smallSize < 0, c.bigSize < 0:
		return nil, errors.New("body sizes must not be negative")
	}
	return c, nil
}
