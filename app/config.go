package app

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strings"
	"time"

	"github.com/reverst-dev/reverst/internal/flagenv"
)

// EnvPrefix starts the name of every environment variable the server reads.
const EnvPrefix = "REVERST_"

// Config is the server's configuration. Every field is set by a flag and by
// the environment variable EnvPrefix + its env tag; a flag given on the
// command line wins.
type Config struct {
	Log               string        `env:"LOG" envDefault:"info"`
	TunnelAddress     string        `env:"TUNNEL_ADDRESS" envDefault:"127.0.0.1:7171"`
	HTTPAddress       string        `env:"HTTP_ADDRESS" envDefault:"0.0.0.0:8181"`
	ServerName        string        `env:"SERVER_NAME"`
	PrivateKeyPath    string        `env:"PRIVATE_KEY_PATH"`
	CertificatePath   string        `env:"CERTIFICATE_PATH"`
	TunnelGroups      string        `env:"TUNNEL_GROUPS" envDefault:"groups.yml"`
	WatchGroups       bool          `env:"WATCH_GROUPS"`
	GroupsPoll        time.Duration `env:"GROUPS_POLL_INTERVAL" envDefault:"10s"`
	ManagementAddress string        `env:"MANAGEMENT_ADDRESS"`
	MaxIdleTimeout    time.Duration `env:"MAX_IDLE_TIMEOUT" envDefault:"1m"`
	KeepAlivePeriod   time.Duration `env:"KEEP_ALIVE_PERIOD" envDefault:"30s"`
	ShutdownTimeout   time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"8s"`

	HTTPSAddress          string `env:"HTTPS_ADDRESS"`
	HTTPSCertificatePath  string `env:"HTTPS_CERTIFICATE_PATH"`
	HTTPSPrivateKeyPath   string `env:"HTTPS_PRIVATE_KEY_PATH"`
	TrustForwardedHeaders bool   `env:"TRUST_FORWARDED_HEADERS"`
	MaxHeaderBytes        int    `env:"MAX_HEADER_BYTES" envDefault:"65536"`

	MaxRequestsPerMember int           `env:"MAX_REQUESTS_PER_MEMBER" envDefault:"0"`
	QueueTimeout         time.Duration `env:"QUEUE_TIMEOUT" envDefault:"1s"`
	RegistrationRate     float64       `env:"REGISTRATION_RATE" envDefault:"50"`
	RegistrationBurst    int           `env:"REGISTRATION_BURST" envDefault:"200"`

	ExternalAuthTimeout  time.Duration `env:"EXTERNAL_AUTH_TIMEOUT" envDefault:"3s"`
	ExternalAuthCache    int           `env:"EXTERNAL_AUTH_CACHE_SIZE" envDefault:"4096"`
	ExternalAuthAllowTTL time.Duration `env:"EXTERNAL_AUTH_ALLOW_TTL" envDefault:"1m"`
	ExternalAuthDenyTTL  time.Duration `env:"EXTERNAL_AUTH_DENY_TTL" envDefault:"10s"`
}

func configOptions() []flagenv.Option {
	return []flagenv.Option{
		{Short: "l", Long: "log", Field: "Log", Usage: "debug, info, warn or error; debug adds an access line per request"},
		{Short: "a", Long: "tunnel-address", Field: "TunnelAddress", Usage: "address for accepting tunnelling quic connections"},
		{Short: "s", Long: "http-address", Field: "HTTPAddress", Usage: "address for serving HTTP requests"},
		{Short: "n", Long: "server-name", Field: "ServerName", Required: true, Usage: "server name used to identify tunnel via TLS"},
		{Short: "k", Long: "private-key-path", Field: "PrivateKeyPath", Required: true, Usage: "path to TLS private key PEM file"},
		{Short: "c", Long: "certificate-path", Field: "CertificatePath", Required: true, Usage: "path to TLS certificate PEM file"},
		{Short: "g", Long: "tunnel-groups", Field: "TunnelGroups", Usage: "path to file, file://, http(s):// or k8s://configmap/NS/NAME/KEY source of tunnel groups"},
		{Short: "w", Long: "watch-groups", Field: "WatchGroups", Usage: "watch tunnel groups sources for updates"},
		{Long: "groups-poll-interval", Field: "GroupsPoll", Usage: "how often a watched http(s) groups source is polled"},
		{Long: "management-address", Field: "ManagementAddress", Usage: "HTTP address for management API (/metrics, /healthz, /readyz, /status)"},
		{Long: "max-idle-timeout", Field: "MaxIdleTimeout", Usage: "maximum time a connection can be idle"},
		{Long: "keep-alive-period", Field: "KeepAlivePeriod", Usage: "period between keep-alive events"},
		{Long: "https-address", Field: "HTTPSAddress", Usage: "address for serving HTTPS (HTTP/1.1 and HTTP/2) requests; off when empty"},
		{Long: "https-certificate-path", Field: "HTTPSCertificatePath", Usage: "TLS certificate PEM file of the HTTPS frontend (default: --certificate-path)"},
		{Long: "https-private-key-path", Field: "HTTPSPrivateKeyPath", Usage: "TLS private key PEM file of the HTTPS frontend (default: --private-key-path)"},
		{Long: "trust-forwarded-headers", Field: "TrustForwardedHeaders", Usage: "route by X-Forwarded-Host and extend X-Forwarded-* (only behind a trusted proxy)"},
		{Long: "max-header-bytes", Field: "MaxHeaderBytes", Usage: "largest request header the frontends accept"},
		{Long: "max-requests-per-member", Field: "MaxRequestsPerMember", Usage: "requests in flight per tunnel member before requests queue, 0 for no limit"},
		{Long: "queue-timeout", Field: "QueueTimeout", Usage: "how long a request waits for a member below its limit before a 503"},
		{Long: "registration-rate", Field: "RegistrationRate", Usage: "tunnel registrations per second allowed from one IP address, 0 for no limit"},
		{Long: "registration-burst", Field: "RegistrationBurst", Usage: "burst of registrations allowed from one IP address"},
		{Long: "shutdown-timeout", Field: "ShutdownTimeout", Usage: "time allowed for in-flight requests to finish on SIGTERM (keep it under the grace period of docker stop, 10s by default)"},
		{Long: "external-auth-timeout", Field: "ExternalAuthTimeout", Usage: "timeout of one call to an external authentication endpoint"},
		{Long: "external-auth-cache-size", Field: "ExternalAuthCache", Usage: "external authentication allows kept in the LRU cache (and as many denials)"},
		{Long: "external-auth-allow-ttl", Field: "ExternalAuthAllowTTL", Usage: "how long an allow from an external endpoint is cached"},
		{Long: "external-auth-deny-ttl", Field: "ExternalAuthDenyTTL", Usage: "how long a deny from an external endpoint is cached"},
	}
}

// ErrUsage marks configuration errors: the process should exit with
// status 2 after printing it.
var ErrUsage = flagenv.ErrUsage

// ParseConfig reads environ (nil meaning the process environment) and then
// args. -h and --help return flag.ErrHelp after printing the usage to out.
func ParseConfig(args []string, environ map[string]string, out io.Writer) (*Config, error) {
	var c Config
	set := c.settings()
	rest, err := set.Parse(args, environ)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(out, "reverst: a load-balanced HTTP reverse tunnel over QUIC\n\nUSAGE\n  reverst [FLAGS]\n\nFLAGS\n")
		set.PrintFlags(out)
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("%w: unexpected arguments %q (see reverst -h)", ErrUsage, rest)
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUsage, err)
	}
	return &c, nil
}

func (c *Config) settings() *flagenv.Set {
	return &flagenv.Set{Command: "reverst", Prefix: EnvPrefix, Settings: c, Options: configOptions()}
}

func (c *Config) validate() error {
	name := c.settings().Name
	var errs []error
	if _, err := c.level(); err != nil {
		errs = append(errs, err)
	}
	for _, d := range []struct {
		long string
		v    time.Duration
	}{
		{"max-idle-timeout", c.MaxIdleTimeout},
		{"keep-alive-period", c.KeepAlivePeriod},
		{"shutdown-timeout", c.ShutdownTimeout},
		{"groups-poll-interval", c.GroupsPoll},
		{"queue-timeout", c.QueueTimeout},
		{"external-auth-timeout", c.ExternalAuthTimeout},
		{"external-auth-allow-ttl", c.ExternalAuthAllowTTL},
		{"external-auth-deny-ttl", c.ExternalAuthDenyTTL},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be positive, got %s", name(d.long), d.v))
		}
	}
	for _, n := range []struct {
		long string
		v    float64
	}{
		{"max-requests-per-member", float64(c.MaxRequestsPerMember)},
		{"registration-rate", c.RegistrationRate},
		{"registration-burst", float64(c.RegistrationBurst)},
	} {
		switch {
		case math.IsNaN(n.v):
			// NaN passes every comparison: as a rate it would turn
			// the limit off unnoticed.
			errs = append(errs, fmt.Errorf("%s: must be a number, got NaN", name(n.long)))
		case n.v < 0:
			errs = append(errs, fmt.Errorf("%s: must not be negative, got %v", name(n.long), n.v))
		}
	}
	// Every listener takes TCP, the tunnel address's too (its port takes
	// the data connections).
	type listener struct{ long, v string }
	var tcp []listener
	for _, a := range []struct {
		long, network, v string
		optional         bool
	}{
		{"tunnel-address", "udp", c.TunnelAddress, false},
		{"http-address", "tcp", c.HTTPAddress, false},
		{"https-address", "tcp", c.HTTPSAddress, true},
		{"management-address", "tcp", c.ManagementAddress, true},
	} {
		if a.v == "" && a.optional {
			continue
		}
		if err := checkAddress(a.network, a.v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name(a.long), err))
			continue
		}
		tcp = append(tcp, listener{a.long, a.v})
	}
	// Two of them on one TCP port would fail only once started, with an
	// "address already in use" that does not say which setting holds it,
	// nor that the tunnel address takes TCP.
	for i, a := range tcp {
		for _, b := range tcp[:i] {
			if sameTCPPort(a.v, b.v) {
				err := fmt.Errorf("%s %q and %s %q listen on the same TCP port", name(b.long), b.v, name(a.long), a.v)
				if b.long == "tunnel-address" {
					err = fmt.Errorf("%w (the tunnel address takes its data connections on TCP)", err)
				}
				errs = append(errs, err)
			}
		}
	}
	if c.MaxHeaderBytes < 1024 {
		errs = append(errs, fmt.Errorf("%s: must be at least 1024, got %d", name("max-header-bytes"), c.MaxHeaderBytes))
	}
	if (c.HTTPSCertificatePath == "") != (c.HTTPSPrivateKeyPath == "") {
		errs = append(errs, fmt.Errorf("%s and %s go together", name("https-certificate-path"), name("https-private-key-path")))
	} else if c.HTTPSCertificatePath != "" && c.HTTPSAddress == "" {
		// Whoever sets the frontend's certificate means to serve HTTPS;
		// without an address there is no HTTPS frontend to use it.
		errs = append(errs, fmt.Errorf("%s and %s are set but %s is not: no HTTPS frontend would serve them", name("https-certificate-path"), name("https-private-key-path"), name("https-address")))
	}
	if c.ExternalAuthCache < 1 {
		errs = append(errs, fmt.Errorf("%s: must be at least 1, got %d", name("external-auth-cache-size"), c.ExternalAuthCache))
	}
	if c.KeepAlivePeriod >= c.MaxIdleTimeout && c.MaxIdleTimeout > 0 {
		errs = append(errs, fmt.Errorf("%s (%s) must be shorter than %s (%s)", name("keep-alive-period"), c.KeepAlivePeriod, name("max-idle-timeout"), c.MaxIdleTimeout))
	}
	return errors.Join(errs...)
}

func (c *Config) level() (slog.Level, error) {
	l, err := flagenv.Level(c.Log)
	if err != nil {
		return 0, fmt.Errorf("--log (%sLOG): %w", EnvPrefix, err)
	}
	return l, nil
}

// checkAddress tells whether a listen address is HOST:PORT with a port
// net.Listen takes (a number up to 65535 or a service name), so that a
// mistyped address is a usage error rather than a failure after start.
func checkAddress(network, addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err == nil && port == "" {
		// net.Listen takes it for port 0, a free port nobody is told
		// of: an unset variable in HOST:$PORT, most likely.
		err = errors.New("missing port")
	}
	if err == nil {
		_, err = net.LookupPort(network, port)
	}
	if err != nil {
		return fmt.Errorf("invalid address %q, want HOST:PORT such as 127.0.0.1:7171 or :7171: %w", addr, err)
	}
	return nil
}

// sameTCPPort tells whether two listen addresses, valid ones, would take
// the same TCP port: the same port number (not 0, a free one each) on the
// same host or on all addresses (Go listens on both IPv4 and IPv6 for an
// unspecified host). Host names are compared as written.
func sameTCPPort(a, b string) bool {
	ha, pa, _ := net.SplitHostPort(a)
	hb, pb, _ := net.SplitHostPort(b)
	na, _ := net.LookupPort("tcp", pa)
	nb, _ := net.LookupPort("tcp", pb)
	if na == 0 || na != nb {
		return false
	}
	all := func(h string) bool {
		ip := net.ParseIP(h)
		return h == "" || ip != nil && ip.IsUnspecified()
	}
	if all(ha) || all(hb) {
		return true
	}
	if ia, ib := net.ParseIP(ha), net.ParseIP(hb); ia != nil && ib != nil {
		return ia.Equal(ib)
	}
	return strings.EqualFold(ha, hb)
}
