package sources

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/groups"
)

// definitionServer serves a definition with an ETag and Last-Modified and
// answers conditional requests, like a static file server or a bucket.
type definitionServer struct {
	mu          sync.Mutex
	body        []byte
	modified    time.Time
	status      int // when not 0, answer this instead
	requests    int
	conditional int // requests that carried both validators
	notModified int
}

func (d *definitionServer) set(body []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.body, d.status = body, 0
	d.modified = d.modified.Add(time.Minute)
}

func (d *definitionServer) fail(status int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status = status
}

func (d *definitionServer) counts() (requests, conditional, notModified int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.requests, d.conditional, d.notModified
}

func (d *definitionServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.requests++
	if d.status != 0 {
		http.Error(w, "failing on purpose", d.status)
		return
	}
	etag := fmt.Sprintf(`"%x"`, sha256.Sum256(d.body))
	lastModified := d.modified.UTC().Format(http.TimeFormat)
	inm, ims := r.Header.Get("If-None-Match"), r.Header.Get("If-Modified-Since")
	if inm != "" && ims != "" {
		d.conditional++
	}
	w.Header().Set("ETag", etag)
	w.Header().Set("Last-Modified", lastModified)
	if inm == etag && ims == lastModified {
		d.notModified++
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/yaml")
	_, _ = w.Write(d.body)
}

func newDefinitionServer(t *testing.T, body []byte) (*definitionServer, *httptest.Server) {
	d := &definitionServer{body: body, modified: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	srv := httptest.NewServer(d)
	t.Cleanup(srv.Close)
	return d, srv
}

func openURL(t *testing.T, location string, maxBytes int64) (Source, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	src, err := Open(location, Options{
		Registerer:   reg,
		PollInterval: 20 * time.Millisecond,
		MaxBackoff:   100 * time.Millisecond,
		MaxBytes:     maxBytes,
	})
	if err != nil {
		t.Fatal(err)
	}
	return src, reg
}

func TestURLFollowsServer(t *testing.T) {
	d, srv := newDefinitionServer(t, definition("a"))
	src, reg := openURL(t, srv.URL+"/groups.yml", 0)
	cfg, err := src.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Groups) != 1 || cfg.Groups["a"].Hosts[0] != "a.example" {
		t.Fatalf("Load = %+v", cfg)
	}
	a := newApplied()
	watch(t, src, a)

	// Unchanged: conditional requests answered 304, nothing applied.
	eventually(t, "304 answers", func() bool { _, c, nm := d.counts(); return c >= 2 && nm >= 2 })
	if calls := a.snapshot(); len(calls) != 0 {
		t.Fatalf("unchanged definition applied: %v", calls)
	}

	d.set(definition("a", "b"))
	a.waitLast(t, "a", "b")

	// Failing server: counted, reported, last good kept.
	failures := reloads(t, reg, src.String(), "failure")
	d.fail(http.StatusInternalServerError)
	eventually(t, "failure counted", func() bool { return reloads(t, reg, src.String(), "failure") > failures })
	if err := src.Status(); err == nil || !strings.Contains(err.Error(), "500") {
		t.Errorf("Status while failing = %v, want the 500", err)
	}

	// Back to the same content: healthy, nothing applied again.
	d.set(definition("a", "b"))
	eventually(t, "healthy", func() bool { return src.Status() == nil })

	// An invalid body is an error, not an empty or partial config.
	failures = reloads(t, reg, src.String(), "failure")
	d.set(broken)
	eventually(t, "invalid body counted", func() bool { return reloads(t, reg, src.String(), "failure") > failures })
	if err := src.Status(); err == nil || !strings.Contains(err.Error(), `group "x"`) {
		t.Errorf("Status with an invalid body = %v, want the group named", err)
	}
	d.set(nil)
	eventually(t, "empty body reported", func() bool {
		err := src.Status()
		return err != nil && strings.Contains(err.Error(), "empty")
	})

	d.set(definition("c"))
	a.waitLast(t, "c")
	if calls := a.snapshot(); len(calls) != 2 {
		t.Errorf("applied %v, want [[a b] [c]]", calls)
	}
	eventually(t, "healthy after a good definition", func() bool { return src.Status() == nil })
}

func TestURLErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status int
		body   []byte
		want   string
	}{
		{"not found", http.StatusNotFound, nil, "404"},
		{"server error", http.StatusInternalServerError, nil, "500"},
		{"304 to an unconditional request", http.StatusNotModified, nil, "304"},
		{"oversize body", 0, definition("a", "b", "c", "d", "e", "f", "g", "h"), "too large"},
		{"empty body", 0, []byte{}, "empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, srv := newDefinitionServer(t, tc.body)
			if tc.status != 0 {
				d.fail(tc.status)
			}
			src, reg := openURL(t, srv.URL, 100)
			_, err := src.Load(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load error = %v, want one mentioning %q", err, tc.want)
			}
			if tc.want == "too large" && !errors.Is(err, errTooLarge) {
				t.Errorf("oversize body: %v does not wrap errTooLarge", err)
			}
			if got := reloads(t, reg, src.String(), "failure"); got != 1 {
				t.Errorf("failures = %v, want 1", got)
			}
			if src.Status() == nil {
				t.Error("Status nil after a failed Load")
			}
		})
	}
}

func TestURLWatchRecoversFromStartFailure(t *testing.T) {
	d, srv := newDefinitionServer(t, definition("a"))
	d.fail(http.StatusServiceUnavailable)
	src, _ := openURL(t, srv.URL, 0)
	a := newApplied()
	watch(t, src, a)
	eventually(t, "retries", func() bool { r, _, _ := d.counts(); return r >= 3 })
	if err := src.Status(); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("Status while the server fails = %v, want the 503", err)
	}
	d.set(definition("a"))
	a.waitLast(t, "a")
	eventually(t, "healthy", func() bool { return src.Status() == nil })
}

func TestURLRedactsCredentials(t *testing.T) {
	_, srv := newDefinitionServer(t, definition("a"))
	loc := strings.Replace(srv.URL, "http://", "http://user:s3cret@", 1) + "/x?token=s3cret"
	src, _ := openURL(t, loc, 0)
	srv.Close()
	_, err := src.Load(context.Background())
	if err == nil {
		t.Fatal("Load from a closed server succeeded")
	}
	for _, s := range []string{src.String(), err.Error()} {
		if strings.Contains(s, "s3cret") {
			t.Errorf("credential leaked: %q", s)
		}
	}
}

// A definition whose apply was refused is offered again at the next poll,
// though the server would answer 304 to the validators of its body, and
// Status reports the failure meanwhile.
func TestURLRefusedApplyIsRetriedAndReported(t *testing.T) {
	srv := &definitionServer{}
	srv.set([]byte(`groups: {a: {hosts: [a.example]}}`))
	ts := httptest.NewServer(srv)
	defer ts.Close()
	src, err := Open(ts.URL, Options{PollInterval: 20 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	calls := 0
	apply := func(cfg *groups.Config) error {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls == 1 {
			return errors.New("refused once")
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = src.Watch(ctx, apply) }()
	srv.set([]byte(`groups: {b: {hosts: [b.example]}}`))

	// A poll every 20 ms: wait for the retry to be applied and reported,
	// however slowly a busy machine polls.
	offered := func() int {
		mu.Lock()
		defer mu.Unlock()
		return calls
	}
	deadline := time.Now().Add(waitFor)
	for (offered() < 2 || src.Status() != nil) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := offered(); n < 2 {
		t.Errorf("the refused definition was offered %d time(s) in %v; never retried", n, waitFor)
	}
	if err := src.Status(); err != nil {
		t.Errorf("Status() = %v once the definition was applied", err)
	}
}

// A 304 is an answer to validators only: a server (or a cache in front of
// it) answering 304 to a poll that sent none, here after a definition was
// refused, has not said that the definition in force is current. The poll
// is a failure, as it is for Load, not a healthy "unchanged".
func TestURLNotModifiedWithoutValidatorsIsAFailure(t *testing.T) {
	var notModified atomic.Bool
	body := []byte(`groups: {a: {hosts: [a.example]}}`)
	var mu sync.Mutex
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if notModified.Load() {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		_, _ = w.Write(body) // no ETag, no Last-Modified
	}))
	defer ts.Close()
	src, reg := openURL(t, ts.URL, 0)
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	a := newApplied()
	a.err = errors.New("refused")
	mu.Lock()
	body = []byte(`groups: {b: {hosts: [b.example]}}`)
	mu.Unlock()
	watch(t, src, a)
	a.waitLast(t, "b")
	notModified.Store(true)
	before := reloads(t, reg, src.String(), "failure")
	// Polls every 20 to 100 ms, all answered 304: wait for them to be
	// counted and reported, however slowly a busy machine polls.
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		err := src.Status()
		if err != nil && strings.Contains(err.Error(), "304") && reloads(t, reg, src.String(), "failure") > before {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := src.Status(); err == nil {
		t.Error("Status nil: a 304 without validators reported as the definition in force")
	} else if !strings.Contains(err.Error(), "304") {
		t.Errorf("Status = %v, want the unexpected 304", err)
	}
	if after := reloads(t, reg, src.String(), "failure"); after <= before {
		t.Errorf("failures %v -> %v: the 304s were not counted", before, after)
	}
}
