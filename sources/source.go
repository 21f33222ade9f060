// Package sources reads tunnel group definitions from where operators keep
// them (a file, a URL, a Kubernetes ConfigMap) and, when asked, watches them
// for changes. A source only delivers validated definitions; applying them
// is the caller's business.
//
// The intended use is Load once at start (fail fast on a broken definition),
// apply it, then Watch for the life of the process:
//
//	src, err := sources.Open(location, opts)
//	cfg, err := src.Load(ctx)
//	apply(cfg)
//	go src.Watch(ctx, apply) // skips the definition Load already returned
//
// Secrets reads bearer tokens named by tokenPath (a file or
// k8s://secret/NAMESPACE/NAME/KEY), following rotation.
package sources

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/rest"

	"github.com/reverst-dev/reverst/groups"
)

// Source delivers group definitions.
type Source interface {
	// Load reads and validates the current definition once. A definition
	// that Load returned is not delivered again by a later Watch unless it
	// changes in between.
	Load(ctx context.Context) (*groups.Config, error)
	// Watch calls apply with every new valid definition until ctx is done,
	// then returns ctx.Err(). It reads the current definition first, so a
	// change between Load and Watch is not lost. An error from apply counts
	// as a failed reload and keeps the last good definition. Invalid
	// definitions and read failures are logged, counted and retried; they
	// never end Watch. apply is called from Watch's goroutine, one call at
	// a time.
	Watch(ctx context.Context, apply func(*groups.Config) error) error
	// Status reports the source's state: nil when the last read delivered a
	// valid definition that is in force (or an unchanged one), else why not
	// (unreadable, invalid, refused by apply, deleted). Before the first
	// read it returns an error wrapping ErrNotLoaded. Safe to call from any
	// goroutine; meant for /readyz. A failing source keeps serving the last
	// good definition, so readiness may prefer to report rather than fail.
	Status() error
	// String names the source in logs and metric labels, without
	// credentials.
	String() string
}

// ErrNotLoaded is wrapped by Status before a source has read anything.
var ErrNotLoaded = errors.New("no valid definition loaded yet")

// Defaults of Options.
const (
	DefaultPollInterval = 10 * time.Second
	DefaultMaxBytes     = 4 << 20
	DefaultDebounce     = 150 * time.Millisecond
	DefaultMaxBackoff   = 2 * time.Minute
)

// Options configure the sources that Open returns. The zero value works:
// no metrics, discarded logs, the defaults above.
type Options struct {
	Logger *slog.Logger
	// Registerer receives the reload metrics; nil registers none. Several
	// sources may share one Registerer.
	Registerer prometheus.Registerer
	// PollInterval is how often a URL source asks for changes
	// (DefaultPollInterval when zero).
	PollInterval time.Duration
	// MaxBackoff caps the wait between retries of a failing source
	// (DefaultMaxBackoff when zero).
	MaxBackoff time.Duration
	// MaxBytes caps the size of a definition (DefaultMaxBytes when zero).
	MaxBytes int64
	// Debounce is how long a file source waits for a burst of file system
	// events to settle before reading (DefaultDebounce when zero).
	Debounce time.Duration
	// HTTPClient is used by URL sources (http.DefaultClient when nil).
	HTTPClient *http.Client
	// Kube is the API server configuration for k8s:// locations; nil means
	// the in-cluster configuration, else KUBECONFIG (or ~/.kube/config).
	Kube *rest.Config
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.PollInterval <= 0 {
		o.PollInterval = DefaultPollInterval
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	if o.HTTPClient == nil {
		o.HTTPClient = http.DefaultClient
	}
	return o
}

// Open returns the source for location: a path, a file:// URL, an
// http(s):// URL or k8s://configmap/NAMESPACE/NAME/KEY. It does not read
// the location; Load and Watch do.
func Open(location string, opts Options) (Source, error) {
	opts = opts.withDefaults()
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	scheme, _, ok := strings.Cut(location, "://")
	if !ok {
		return newFile(location, opts, m), nil
	}
	switch scheme {
	case "file":
		u, err := url.Parse(location)
		if err != nil {
			return nil, fmt.Errorf("tunnel groups %q: %w", location, err)
		}
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("tunnel groups %q: file URL must name a local absolute path (file:///path)", location)
		}
		return newFile(u.Path, opts, m), nil
	case "http", "https":
		u, err := url.Parse(location)
		if err != nil {
			return nil, fmt.Errorf("tunnel groups: %w", redactErr(err))
		}
		if u.Host == "" {
			return nil, fmt.Errorf("tunnel groups %s: missing host", redact(u))
		}
		return newURL(u, opts, m), nil
	case "k8s":
		ref, err := parseKubeRef(location, "configmap")
		if err != nil {
			return nil, fmt.Errorf("tunnel groups: %w", err)
		}
		return newConfigMap(ref, opts, m), nil
	default:
		return nil, fmt.Errorf("tunnel groups %q: unsupported scheme %q", location, scheme)
	}
}
