package sources

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/groups"
)

// reloader is what every source shares: it turns raw definitions into
// applied ones, skips content it has already seen, keeps the last good
// definition when a new one is bad, and keeps the state, logs and metrics.
// Its methods are safe for concurrent use; apply is never called under its
// lock.
type reloader struct {
	name    string
	log     *slog.Logger
	success prometheus.Counter
	failure prometheus.Counter
	lastOK  prometheus.Gauge

	mu       sync.Mutex
	status   error
	good     [sha256.Size]byte // last definition loaded or applied
	haveGood bool
	seen     [sha256.Size]byte // last definition offered, and its verdict
	haveSeen bool
	seenErr  error
}

func newReloader(name string, log *slog.Logger, m *metrics) *reloader {
	return &reloader{
		name:    name,
		log:     log.With("source", name),
		success: m.reloads.WithLabelValues(name, "success"),
		failure: m.reloads.WithLabelValues(name, "failure"),
		lastOK:  m.lastSuccess.WithLabelValues(name),
		status:  fmt.Errorf("%s: %w", name, ErrNotLoaded),
	}
}

// Status implements Source.Status.
func (r *reloader) Status() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// load parses data for Source.Load: it counts the outcome and remembers a
// good definition so that Watch does not deliver it again.
func (r *reloader) load(data []byte) (*groups.Config, error) {
	h := sha256.Sum256(data)
	cfg, err := groups.Parse(data)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen, r.haveSeen = h, true
	if err != nil {
		err = fmt.Errorf("%s: invalid definition: %w", r.name, err)
		r.seenErr, r.status = err, err
		r.failure.Inc()
		return nil, err
	}
	r.good, r.haveGood = h, true
	r.seenErr, r.status = nil, nil
	r.success.Inc()
	r.lastOK.SetToCurrentTime()
	return cfg, nil
}

// offer hands a freshly read definition to apply unless it is the one
// already in force or one already rejected. It returns the definition's
// verdict: nil when it is in force.
func (r *reloader) offer(data []byte, apply func(*groups.Config) error) error {
	h := sha256.Sum256(data)
	r.mu.Lock()
	switch {
	case r.haveSeen && h == r.seen:
		r.status = r.seenErr
		r.mu.Unlock()
		return r.seenErr
	case r.haveGood && h == r.good:
		// Back to the definition in force after a bad one: nothing to apply.
		r.seen, r.seenErr, r.status = h, nil, nil
		r.mu.Unlock()
		r.log.Info("tunnel groups back to the definition in force")
		return nil
	}
	r.mu.Unlock()

	cfg, err := groups.Parse(data)
	if err != nil {
		err = fmt.Errorf("%s: invalid definition, keeping the last good one: %w", r.name, err)
		r.mu.Lock()
		r.seen, r.haveSeen, r.seenErr, r.status = h, true, err, err
		r.mu.Unlock()
		r.failure.Inc()
		r.log.Error("tunnel groups reload rejected", "error", err)
		return err
	}
	if err := apply(cfg); err != nil {
		// Not remembered as seen: the same content is tried again when it is
		// delivered again.
		err = fmt.Errorf("%s: applying definition, keeping the last good one: %w", r.name, err)
		r.mu.Lock()
		r.status = err
		r.mu.Unlock()
		r.failure.Inc()
		r.log.Error("tunnel groups reload failed", "error", err)
		return err
	}
	r.mu.Lock()
	r.good, r.haveGood = h, true
	r.seen, r.haveSeen, r.seenErr, r.status = h, true, nil, nil
	r.mu.Unlock()
	r.success.Inc()
	r.lastOK.SetToCurrentTime()
	r.log.Info("tunnel groups reloaded", "groups", len(cfg.Groups))
	return nil
}

// unchanged records that the source reports no change since the last
// definition offered (an HTTP 304): its verdict stands.
func (r *reloader) unchanged() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.haveSeen {
		r.status = r.seenErr
	}
}

// fail records a failure to read the definition; the last good one stays,
// if there is one.
func (r *reloader) fail(err error) {
	r.mu.Lock()
	r.status = err
	haveGood := r.haveGood
	r.mu.Unlock()
	r.failure.Inc()
	if !haveGood {
		r.log.Warn("tunnel groups source failing, no definition loaded yet", "error", err)
		return
	}
	r.log.Warn("tunnel groups source failing, keeping the last good definition", "error", err)
}

// retryBackoff is the wait between retries of a failing source: from
// initial, doubling, up to max, with jitter so replicas spread out.
func retryBackoff(initial, maxWait time.Duration) *backoff.ExponentialBackOff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = initial
	b.MaxInterval = max(initial, maxWait)
	b.Reset()
	return b
}

// sleep waits d, or returns ctx's error once it is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

var errTooLarge = errors.New("definition too large")

// readAll reads r up to limit bytes; more is an error, not a truncation.
func readAll(r io.Reader, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%w: more than %d bytes", errTooLarge, limit)
	}
	return data, nil
}

func readFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAll(f, limit)
}
