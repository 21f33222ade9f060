// Package auth decides whether a tunnel client may register in a group.
//
// A [Factory] turns a group's [groups.Authentication] into an
// [Authenticator]. The client's credentials are the "Authorization" value of
// its registration metadata, "SCHEME PAYLOAD" as in HTTP; the scheme
// (compared case-insensitively) selects one of the group's strategies:
//
//   - basic: base64("user:pass"), compared in constant time;
//   - bearer: a static token, given in the definition, as a hex SHA-256
//     digest, or read from a file or Kubernetes Secret on every
//     registration so that a rotated secret applies to the next one;
//   - external: an HTTP endpoint decides (200 allows, another 2xx or a
//     4xx denies; a 3xx, 408, 429 or 5xx, or no answer, is an error the
//     client may retry), with a decision cache shared by all the
//     groups built by one Factory; credentials that cannot be sent as a
//     header value are denied without a call.
//
// A scheme the group has no strategy for is denied; a group with no
// strategy at all is open and admits everyone.
//
// Authenticate returns nil to allow, an error wrapping
// [protocol.ErrUnauthorized] to deny, and any other error when it cannot
// decide (an unreadable secret, an endpoint that is down); such errors must
// be treated as server errors, never as allow. No credential, token or
// password appears in an error or log line of this package.
package auth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
)

// Authenticator decides on a registration from its metadata. It returns nil
// to allow, an error wrapping [protocol.ErrUnauthorized] to deny, and any
// other error when it cannot decide. It is safe for concurrent use.
type Authenticator interface {
	Authenticate(ctx context.Context, metadata map[string]string) error
}

// MetadataKey is the registration metadata key that carries credentials.
const MetadataKey = "Authorization"

// Defaults of the external strategy, used for zero Factory fields.
const (
	DefaultCacheSize       = 4096
	DefaultCacheAllowTTL   = time.Minute
	DefaultCacheDenyTTL    = 10 * time.Second
	DefaultExternalTimeout = 3 * time.Second
)

// maxExternalCalls bounds the calls to external endpoints in flight at
// once, for all of a Factory's groups: registrations with credentials
// nobody has presented before (a flood of made-up tokens from many
// addresses) wait for a slot, within the call's timeout, rather than open
// a connection each. Identical credentials share one call anyway.
const maxExternalCalls = 64

// Factory builds Authenticators from group definitions. The zero value is
// ready to use. Fields must not change after the first call to New: the
// decision cache and the metrics are created then, once, and shared by every
// Authenticator the Factory builds, across groups and reloads. Keeping one
// Factory for the life of the process is what keeps the cache warm over a
// reload; cache keys include the endpoint, so a group whose endpoint changes
// starts cold. A Factory must not be copied after first use.
type Factory struct {
	// Logger receives debug lines about decisions; nil discards them.
	Logger *slog.Logger

	// HTTPClient calls external endpoints; nil means a client of the
	// Factory's own, which keeps a connection for each call that may be
	// in flight. The Factory uses a copy that does not follow redirects (a
	// 3xx answer is an error), so the credentials are only ever sent to
	// the configured endpoint.
	HTTPClient *http.Client

	// ReadSecret reads bearer tokenPath and hashedTokenPath values at
	// authentication time. nil reads a local file; a k8s://secret/... path
	// then fails, so an application that allows such paths plugs in a
	// reader that understands them. Errors are server errors, not denials.
	ReadSecret func(ctx context.Context, path string) ([]byte, error)

	// CacheSize bounds the external decision cache: that many allows and
	// as many denials, kept apart so that made-up credentials cannot push
	// out the allows of real members; 0 means DefaultCacheSize, a
	// negative value disables the cache.
	CacheSize int
	// CacheAllowTTL and CacheDenyTTL are how long an external allow or
	// deny is reused; 0 means the default, a negative value disables
	// caching of that decision. Errors are never cached.
	CacheAllowTTL time.Duration
	CacheDenyTTL  time.Duration
	// ExternalTimeout bounds one call to an external endpoint; 0 means
	// DefaultExternalTimeout.
	ExternalTimeout time.Duration

	// Registerer receives the Factory's metrics; nil means no metrics:
	// reverst_auth_external_requests_total{result=allow|deny|error},
	// reverst_auth_external_request_duration_seconds{result},
	// reverst_auth_external_cache_hits_total and _misses_total.
	Registerer prometheus.Registerer

	once     sync.Once
	initErr  error
	client   *http.Client
	calls    chan struct{} // a slot per call in flight
	allows   *expirable.LRU[cacheKey, decision]
	denials  *expirable.LRU[cacheKey, decision]
	allowTTL time.Duration
	denyTTL  time.Duration
	timeout  time.Duration
	flight   singleflight.Group
	metrics  *metrics
	now      func() time.Time // tests move time; nil is time.Now
}

func (f *Factory) init() error {
	f.once.Do(func() {
		c := f.HTTPClient
		if c == nil {
			t := http.DefaultTransport.(*http.Transport).Clone()
			t.MaxIdleConnsPerHost = maxExternalCalls
			c = &http.Client{Transport: t}
		}
		f.calls = make(chan struct{}, maxExternalCalls)
		noRedirect := *c
		noRedirect.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
		f.client = &noRedirect

		f.allowTTL = durationOr(f.CacheAllowTTL, DefaultCacheAllowTTL)
		f.denyTTL = durationOr(f.CacheDenyTTL, DefaultCacheDenyTTL)
		f.timeout = durationOr(f.ExternalTimeout, DefaultExternalTimeout)
		size := f.CacheSize
		if size == 0 {
			size = DefaultCacheSize
		}
		if size > 0 && f.allowTTL > 0 {
			f.allows = expirable.NewLRU[cacheKey, decision](size, nil, f.allowTTL)
		}
		if size > 0 && f.denyTTL > 0 {
			f.denials = expirable.NewLRU[cacheKey, decision](size, nil, f.denyTTL)
		}

		m, err := newMetrics(f.Registerer)
		if err != nil {
			f.initErr = fmt.Errorf("auth: registering metrics: %w", err)
			return
		}
		f.metrics = m
	})
	return f.initErr
}

// durationOr returns d, or def when d is zero; negative stays negative
// (disabled).
func durationOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func (f *Factory) logger() *slog.Logger {
	if f.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return f.Logger
}

func (f *Factory) clock() time.Time {
	if f.now != nil {
		return f.now()
	}
	return time.Now()
}

func (f *Factory) readSecret(ctx context.Context, path string) ([]byte, error) {
	if f.ReadSecret != nil {
		return f.ReadSecret(ctx, path)
	}
	if strings.HasPrefix(path, "k8s://") {
		return nil, errors.New("no reader for k8s:// secrets is configured")
	}
	return os.ReadFile(path)
}

// New builds the Authenticator of one group. A definition with no strategy
// gives an Authenticator that allows everyone. Errors name the field at
// fault and never its value.
func (f *Factory) New(a groups.Authentication) (Authenticator, error) {
	if err := f.init(); err != nil {
		return nil, err
	}
	s := &strategies{byScheme: map[string]checker{}, log: f.logger()}
	add := func(name, scheme, def string, c checker) error {
		scheme = groups.SchemeOr(scheme, def)
		if scheme == "" || strings.ContainsAny(scheme, " \t") {
			return fmt.Errorf("auth: %s.scheme must be a single word", name)
		}
		key := strings.ToLower(scheme)
		if _, dup := s.byScheme[key]; dup {
			return fmt.Errorf("auth: %s.scheme: scheme is already used by another strategy", name)
		}
		s.byScheme[key] = c
		s.names = append(s.names, name)
		return nil
	}
	if b := a.Basic; b != nil {
		c, err := newBasic(b)
		if err != nil {
			return nil, err
		}
		if err := add("basic", b.Scheme, groups.SchemeBasic, c); err != nil {
			return nil, err
		}
	}
	if b := a.Bearer; b != nil {
		c, err := newBearer(f, b)
		if err != nil {
			return nil, err
		}
		if err := add("bearer", b.Scheme, groups.SchemeBearer, c); err != nil {
			return nil, err
		}
	}
	if e := a.External; e != nil {
		c, err := newExternal(f, e)
		if err != nil {
			return nil, err
		}
		if err := add("external", e.Scheme, groups.SchemeExternal, c); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// checker verifies the payload of credentials whose scheme selected it.
// presented is the whole Authorization value as the client sent it.
type checker interface {
	check(ctx context.Context, presented, scheme, payload string) error
}

// strategies is a group's Authenticator: its checkers by lower-case scheme.
type strategies struct {
	byScheme map[string]checker
	names    []string
	log      *slog.Logger
}

// Deny reasons. They wrap protocol.ErrUnauthorized and carry nothing the
// client sent: a client may put its secret where the scheme belongs.
var (
	errNoCredentials = fmt.Errorf("%w: no credentials", protocol.ErrUnauthorized)
	errScheme        = fmt.Errorf("%w: scheme not accepted by the group", protocol.ErrUnauthorized)
	errBadCredential = fmt.Errorf("%w: invalid credentials", protocol.ErrUnauthorized)
)

// Authenticate implements Authenticator.
func (s *strategies) Authenticate(ctx context.Context, metadata map[string]string) error {
	if len(s.byScheme) == 0 {
		return nil
	}
	presented, ok := credentials(metadata)
	if !ok {
		s.log.DebugContext(ctx, "registration denied", "reason", "no credentials")
		return errNoCredentials
	}
	scheme, payload, _ := strings.Cut(presented, " ")
	payload = strings.TrimLeft(payload, " ")
	c, ok := s.byScheme[strings.ToLower(scheme)]
	if !ok {
		s.log.DebugContext(ctx, "registration denied", "reason", "scheme not accepted", "accepted", s.names)
		return errScheme
	}
	if payload == "" {
		s.log.DebugContext(ctx, "registration denied", "reason", "empty credentials")
		return errBadCredential
	}
	return c.check(ctx, presented, scheme, payload)
}

// credentials finds the Authorization value, preferring the exact key as
// the protocol specifies and accepting any case as HTTP headers do.
func credentials(metadata map[string]string) (string, bool) {
	if v, ok := metadata[MetadataKey]; ok {
		v = strings.TrimSpace(v)
		return v, v != ""
	}
	for k, v := range metadata {
		if strings.EqualFold(k, MetadataKey) {
			v = strings.TrimSpace(v)
			return v, v != ""
		}
	}
	return "", false
}
