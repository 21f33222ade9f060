package main

import (
	"bytes"
	"log/slog"
	"os"
	"strings"
	"testing"
)

// TestMain lets the test binary take the member and server roles, as the
// bench binary does: bench re-executes os.Executable().
func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) != "" {
		os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// TestQuickRun runs the whole benchmark with tiny durations, so that the
// command cannot rot: every measurement must produce a number.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/reverst and runs three processes")
	}
	cfg, err := parseConfig([]string{"-quick", "-rounds", "1", "-c", "8", "-small", "300ms", "-big", "300ms",
		"-lat", "200ms", "-warmup", "100ms", "-idle", "50"}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	rep, err := bench(t.Context(), cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, logs.String())
	}
	if len(rep.rounds) != 1 {
		t.Fatalf("%d rounds, want 1", len(rep.rounds))
	}
	rd := rep.rounds[0]
	for i, name := range []string{"direct", "tunnel"} {
		checks := map[string]float64{
			"small req/s": rd.small[i].load.reqPerSec(),
			"large MiB/s": rd.big[i].load.mibPerSec(),
			"p50":         float64(rd.lat[i].p50),
			"p99":         float64(rd.lat[i].p99),
			"member CPU":  float64(rd.small[i].cpu.member + rd.big[i].cpu.member),
		}
		for what, v := range checks {
			if !(v > 0) {
				t.Errorf("%s %s = %v, want > 0", name, what, v)
			}
		}
	}
	for _, i := range []int{relay, proxy} {
		if rd.lat[i].p50 <= 0 {
			t.Errorf("reference hop %d p50 = %v, want > 0", i, rd.lat[i].p50)
		}
	}
	if rd.small[tunnel].cpu.server+rd.big[tunnel].cpu.server <= 0 {
		t.Errorf("no server CPU time measured through the tunnel")
	}
	if rep.serverMem.hwm <= 0 || rep.idle.base.rss <= 0 || rep.idle.loaded.rss <= rep.idle.base.rss || rep.idle.members.rss <= 0 {
		t.Errorf("memory not measured: server %+v, idle %+v", rep.serverMem, rep.idle)
	}

	var out bytes.Buffer
	rep.write(&out)
	for _, want := range []string{"small req/s", "sequential p50 ms", "with 50 idle tunnels", "small-body req/s", "added p50 latency", "bare TCP relay", "httputil.ReverseProxy"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	if n := strings.Count(out.String(), "PASS") + strings.Count(out.String(), "MISS"); n != 3 {
		t.Errorf("report has %d goal verdicts, want 3:\n%s", n, out.String())
	}
	t.Logf("report:\n%s", out.String())
}
