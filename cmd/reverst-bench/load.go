package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// target is where the load generator sends requests: the backend itself,
// or the tunnel server's frontend with the group's Host.
type target struct {
	name string // "direct" or "tunnel"
	base string // http://host:port
	host string // Host header; empty for the address in base
}

// newTransport is a keep-alive HTTP/1.1 transport with one connection per
// worker: every worker keeps its own connection for the whole run.
func newTransport(conns int) *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
}

// loadResult is one throughput run.
type loadResult struct {
	reqs, bytes, failed int64
	elapsed             time.Duration
	firstErr            error
}

func (r loadResult) reqPerSec() float64 { return float64(r.reqs) / r.elapsed.Seconds() }
func (r loadResult) mibPerSec() float64 { return float64(r.bytes) / (1 << 20) / r.elapsed.Seconds() }

// maxFailures ends a run early: a broken path is reported, not measured.
const maxFailures = 100

// throughput runs conc workers, each sending requests for path back to
// back on its own keep-alive connection, for d. Each response must be 200
// with a body of want bytes.
func throughput(ctx context.Context, tr *http.Transport, t target, path string, want int64, conc int, d time.Duration) (loadResult, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		res      loadResult
		reqs     atomic.Int64
		bytes    atomic.Int64
		failed   atomic.Int64
		errOnce  sync.Once
		wg       sync.WaitGroup
		start    = time.Now()
		deadline = start.Add(d)
	)
	fail := func(err error) {
		errOnce.Do(func() { res.firstErr = err })
		if failed.Add(1) >= maxFailures {
			cancel()
		}
	}
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			req, err := newRequest(ctx, t, path)
			if err != nil {
				fail(err)
				return
			}
			for ctx.Err() == nil && time.Now().Before(deadline) {
				n, err := fetch(tr, req, buf, want)
				if err != nil {
					fail(err)
					continue
				}
				reqs.Add(1)
				bytes.Add(n)
			}
		}()
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.reqs, res.bytes, res.failed = reqs.Load(), bytes.Load(), failed.Load()
	switch {
	case res.failed >= maxFailures:
		return res, fmt.Errorf("%s %s: %d requests failed, the first with: %w", t.name, path, res.failed, res.firstErr)
	case ctx.Err() != nil:
		return res, ctx.Err()
	case res.reqs == 0:
		return res, fmt.Errorf("%s %s: no request succeeded: %w", t.name, path, res.firstErr)
	}
	return res, nil
}

func newRequest(ctx context.Context, t target, path string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.base+path, nil)
	if err != nil {
		return nil, err
	}
	if t.host != "" {
		req.Host = t.host
	}
	return req, nil
}

var errStatus = errors.New("unexpected response")

// fetch sends req, which may be reused once its response body is closed,
// and reads the whole body into buf.
func fetch(tr *http.Transport, req *http.Request, buf []byte, want int64) (int64, error) {
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return 0, err
	}
	var n int64
	for {
		m, err := resp.Body.Read(buf)
		n += int64(m)
		if err == io.EOF {
			break
		}
		if err != nil {
			resp.Body.Close()
			return n, err
		}
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || n != want {
		return n, fmt.Errorf("%w: status %d, %d bytes (want 200, %d bytes)", errStatus, resp.StatusCode, n, want)
	}
	return n, nil
}

// latencyResult is what one target gave in a latency run: its requests
// were sequential on a single connection.
type latencyResult struct {
	n        int
	p50, p99 time.Duration
}

// latencyTurn is how many requests in a row one target gets in a latency
// run before the next target's turn.
const latencyTurn = 50

// latencies sends requests for path one after the other to each of ts on
// its own keep-alive connection, the targets taking turns of latencyTurn
// requests, until each has had about d; it returns the percentiles of each
// target's request durations (from sending to the end of the body), in the
// order of ts. Turns this short let every target see the same machine: on
// a shared VM, runs of two seconds one after the other differed by 30 µs
// and more, which hid any change to the tunnel smaller than that.
func latencies(ctx context.Context, ts []target, path string, want int64, warmup, d time.Duration) ([]latencyResult, error) {
	trs := make([]*http.Transport, len(ts))
	reqs := make([]*http.Request, len(ts))
	samples := make([][]time.Duration, len(ts))
	for i, t := range ts {
		trs[i] = newTransport(1)
		defer trs[i].CloseIdleConnections()
		var err error
		if reqs[i], err = newRequest(ctx, t, path); err != nil {
			return nil, err
		}
		samples[i] = make([]time.Duration, 0, 1<<16)
	}
	buf := make([]byte, 64<<10)
	for i, t := range ts {
		for end := time.Now().Add(warmup); time.Now().Before(end); {
			if _, err := fetch(trs[i], reqs[i], buf, want); err != nil {
				return nil, fmt.Errorf("%s warm-up: %w", t.name, err)
			}
		}
	}
	for end := time.Now().Add(time.Duration(len(ts)) * d); time.Now().Before(end); {
		for i, t := range ts {
			for range latencyTurn {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				t0 := time.Now()
				if _, err := fetch(trs[i], reqs[i], buf, want); err != nil {
					return nil, fmt.Errorf("%s: %w", t.name, err)
				}
				samples[i] = append(samples[i], time.Since(t0))
			}
		}
	}
	res := make([]latencyResult, len(ts))
	for i, s := range samples {
		slices.Sort(s)
		pct := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
		res[i] = latencyResult{n: len(s), p50: pct(0.50), p99: pct(0.99)}
	}
	return res, nil
}
