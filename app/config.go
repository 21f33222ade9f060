package app

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caarlos0/env/v11"
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
	ShutdownTimeout   time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"15s"`

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

// option describes one setting: its flags, its env var and its help.
type option struct {
	short, long string
	env         string
	usage       string
	required    bool
	bind        func(fs *flag.FlagSet, name string)
	kind        string
	def         string
}

func (c *Config) options() []option {
	str := func(p *string) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.StringVar(p, name, *p, "") }
	}
	dur := func(p *time.Duration) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.DurationVar(p, name, *p, "") }
	}
	integer := func(p *int) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.IntVar(p, name, *p, "") }
	}
	float := func(p *float64) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.Float64Var(p, name, *p, "") }
	}
	boolean := func(p *bool) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.BoolVar(p, name, *p, "") }
	}
	return []option{
		{short: "l", long: "log", env: "LOG", kind: "STRING", def: "info", usage: "debug, info, warn or error", bind: str(&c.Log)},
		{short: "a", long: "tunnel-address", env: "TUNNEL_ADDRESS", kind: "STRING", def: "127.0.0.1:7171", usage: "address for accepting tunnelling quic connections", bind: str(&c.TunnelAddress)},
		{short: "s", long: "http-address", env: "HTTP_ADDRESS", kind: "STRING", def: "0.0.0.0:8181", usage: "address for serving HTTP requests", bind: str(&c.HTTPAddress)},
		{short: "n", long: "server-name", env: "SERVER_NAME", kind: "STRING", required: true, usage: "server name used to identify tunnel via TLS", bind: str(&c.ServerName)},
		{short: "k", long: "private-key-path", env: "PRIVATE_KEY_PATH", kind: "STRING", required: true, usage: "path to TLS private key PEM file", bind: str(&c.PrivateKeyPath)},
		{short: "c", long: "certificate-path", env: "CERTIFICATE_PATH", kind: "STRING", required: true, usage: "path to TLS certificate PEM file", bind: str(&c.CertificatePath)},
		{short: "g", long: "tunnel-groups", env: "TUNNEL_GROUPS", kind: "STRING", def: "groups.yml", usage: "path to file, file://, http(s):// or k8s://configmap/NS/NAME/KEY source of tunnel groups", bind: str(&c.TunnelGroups)},
		{short: "w", long: "watch-groups", env: "WATCH_GROUPS", kind: "BOOL", usage: "watch tunnel groups sources for updates", bind: boolean(&c.WatchGroups)},
		{long: "groups-poll-interval", env: "GROUPS_POLL_INTERVAL", kind: "DURATION", def: "10s", usage: "how often a watched http(s) groups source is polled", bind: dur(&c.GroupsPoll)},
		{long: "management-address", env: "MANAGEMENT_ADDRESS", kind: "STRING", usage: "HTTP address for management API (/metrics, /healthz, /readyz)", bind: str(&c.ManagementAddress)},
		{long: "max-idle-timeout", env: "MAX_IDLE_TIMEOUT", kind: "DURATION", def: "1m0s", usage: "maximum time a connection can be idle", bind: dur(&c.MaxIdleTimeout)},
		{long: "keep-alive-period", env: "KEEP_ALIVE_PERIOD", kind: "DURATION", def: "30s", usage: "period between keep-alive events", bind: dur(&c.KeepAlivePeriod)},
		{long: "https-address", env: "HTTPS_ADDRESS", kind: "STRING", usage: "address for serving HTTPS (HTTP/1.1 and HTTP/2) requests; off when empty", bind: str(&c.HTTPSAddress)},
		{long: "https-certificate-path", env: "HTTPS_CERTIFICATE_PATH", kind: "STRING", usage: "TLS certificate PEM file of the HTTPS frontend (default: --certificate-path)", bind: str(&c.HTTPSCertificatePath)},
		{long: "https-private-key-path", env: "HTTPS_PRIVATE_KEY_PATH", kind: "STRING", usage: "TLS private key PEM file of the HTTPS frontend (default: --private-key-path)", bind: str(&c.HTTPSPrivateKeyPath)},
		{long: "trust-forwarded-headers", env: "TRUST_FORWARDED_HEADERS", kind: "BOOL", usage: "route by X-Forwarded-Host and extend X-Forwarded-* (only behind a trusted proxy)", bind: boolean(&c.TrustForwardedHeaders)},
		{long: "max-header-bytes", env: "MAX_HEADER_BYTES", kind: "INT", def: "65536", usage: "largest request header the frontends accept", bind: integer(&c.MaxHeaderBytes)},
		{long: "max-requests-per-member", env: "MAX_REQUESTS_PER_MEMBER", kind: "INT", usage: "requests in flight per tunnel member before requests queue (default: 0, no limit)", bind: integer(&c.MaxRequestsPerMember)},
		{long: "queue-timeout", env: "QUEUE_TIMEOUT", kind: "DURATION", def: "1s", usage: "how long a request waits for a member below its limit before a 503", bind: dur(&c.QueueTimeout)},
		{long: "registration-rate", env: "REGISTRATION_RATE", kind: "FLOAT", def: "50", usage: "tunnel registrations per second allowed from one IP address, 0 for no limit", bind: float(&c.RegistrationRate)},
		{long: "registration-burst", env: "REGISTRATION_BURST", kind: "INT", def: "200", usage: "burst of registrations allowed from one IP address", bind: integer(&c.RegistrationBurst)},
		{long: "shutdown-timeout", env: "SHUTDOWN_TIMEOUT", kind: "DURATION", def: "15s", usage: "time allowed for in-flight requests to finish on SIGTERM", bind: dur(&c.ShutdownTimeout)},
		{long: "external-auth-timeout", env: "EXTERNAL_AUTH_TIMEOUT", kind: "DURATION", def: "3s", usage: "timeout of one call to an external authentication endpoint", bind: dur(&c.ExternalAuthTimeout)},
		{long: "external-auth-cache-size", env: "EXTERNAL_AUTH_CACHE_SIZE", kind: "INT", def: "4096", usage: "external authentication decisions kept in the LRU cache", bind: integer(&c.ExternalAuthCache)},
		{long: "external-auth-allow-ttl", env: "EXTERNAL_AUTH_ALLOW_TTL", kind: "DURATION", def: "1m0s", usage: "how long an allow from an external endpoint is cached", bind: dur(&c.ExternalAuthAllowTTL)},
		{long: "external-auth-deny-ttl", env: "EXTERNAL_AUTH_DENY_TTL", kind: "DURATION", def: "10s", usage: "how long a deny from an external endpoint is cached", bind: dur(&c.ExternalAuthDenyTTL)},
	}
}

// ErrUsage marks configuration errors: the process should exit with
// status 2 after printing it.
var ErrUsage = errors.New("invalid configuration")

// ParseConfig reads the environment (through lookup, nil meaning the
// process environment) and then args. -h and --help return flag.ErrHelp
// after printing the usage to out.
func ParseConfig(args []string, environ map[string]string, out io.Writer) (*Config, error) {
	var c Config
	opts := env.Options{Prefix: EnvPrefix}
	if environ != nil {
		opts.Environment = environ
	}
	if err := env.ParseWithOptions(&c, opts); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUsage, envError(err))
	}

	fs := flag.NewFlagSet("reverst", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	options := c.options()
	for _, o := range options {
		if o.short != "" {
			o.bind(fs, o.short)
		}
		o.bind(fs, o.long)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(out, options)
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w (see reverst -h)", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected arguments %q (see reverst -h)", ErrUsage, fs.Args())
	}
	if err := c.validate(options); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUsage, err)
	}
	return &c, nil
}

// envError names the environment variable behind each parse error; the
// library only knows the Go field.
func envError(err error) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err
	}
	t := reflect.TypeFor[Config]()
	var errs []error
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			if f, ok := t.FieldByName(pe.Name); ok {
				errs = append(errs, fmt.Errorf("%s%s: %w", EnvPrefix, f.Tag.Get("env"), pe.Err))
				continue
			}
		}
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

func (c *Config) validate(options []option) error {
	var errs []error
	values := map[string]string{"server-name": c.ServerName, "private-key-path": c.PrivateKeyPath, "certificate-path": c.CertificatePath}
	for _, o := range options {
		if o.required && values[o.long] == "" {
			errs = append(errs, fmt.Errorf("missing required setting %s (flag -%s/--%s or env %s%s)", o.long, o.short, o.long, EnvPrefix, o.env))
		}
	}
	if _, err := c.level(); err != nil {
		errs = append(errs, err)
	}
	for name, d := range map[string]time.Duration{"max-idle-timeout": c.MaxIdleTimeout, "keep-alive-period": c.KeepAlivePeriod, "shutdown-timeout": c.ShutdownTimeout, "groups-poll-interval": c.GroupsPoll, "queue-timeout": c.QueueTimeout, "external-auth-timeout": c.ExternalAuthTimeout, "external-auth-allow-ttl": c.ExternalAuthAllowTTL, "external-auth-deny-ttl": c.ExternalAuthDenyTTL} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("--%s: must be positive, got %s", name, d))
		}
	}
	if c.MaxRequestsPerMember < 0 || c.RegistrationRate < 0 || c.RegistrationBurst < 0 {
		errs = append(errs, errors.New("--max-requests-per-member, --registration-rate and --registration-burst must not be negative"))
	}
	if c.MaxHeaderBytes < 1024 {
		errs = append(errs, fmt.Errorf("--max-header-bytes: must be at least 1024, got %d", c.MaxHeaderBytes))
	}
	if (c.HTTPSCertificatePath == "") != (c.HTTPSPrivateKeyPath == "") {
		errs = append(errs, errors.New("--https-certificate-path and --https-private-key-path go together"))
	}
	if c.ExternalAuthCache < 1 {
		errs = append(errs, fmt.Errorf("--external-auth-cache-size: must be at least 1, got %d", c.ExternalAuthCache))
	}
	if c.KeepAlivePeriod >= c.MaxIdleTimeout && c.MaxIdleTimeout > 0 {
		errs = append(errs, fmt.Errorf("--keep-alive-period (%s) must be shorter than --max-idle-timeout (%s)", c.KeepAlivePeriod, c.MaxIdleTimeout))
	}
	return errors.Join(errs...)
}

func (c *Config) level() (slog.Level, error) {
	var l slog.Level
	switch strings.ToLower(c.Log) {
	case "debug":
		l = slog.LevelDebug
	case "info":
		l = slog.LevelInfo
	case "warn", "warning":
		l = slog.LevelWarn
	case "error":
		l = slog.LevelError
	default:
		return 0, fmt.Errorf("--log (%sLOG): %q is not one of debug, info, warn, error", EnvPrefix, c.Log)
	}
	return l, nil
}

func printUsage(out io.Writer, options []option) {
	fmt.Fprintf(out, "reverst: a load-balanced HTTP reverse tunnel over QUIC\n\n")
	fmt.Fprintf(out, "USAGE\n  reverst [FLAGS]\n\nFLAGS\n")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, o := range options {
		name := "    --" + o.long
		if o.short != "" {
			name = "-" + o.short + ", --" + o.long
		}
		if o.kind != "BOOL" {
			name += " " + o.kind
		}
		usage := o.usage
		switch {
		case o.required:
			usage += " (required)"
		case o.def != "":
			usage += " (default: " + o.def + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s [$%s%s]\n", name, usage, EnvPrefix, o.env)
	}
	_ = tw.Flush()
}
