package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"reflect"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/reverst-dev/reverst/client"
)

// envPrefix starts the name of every environment variable the command
// reads; the names are shared with the server where the meaning is the
// same (REVERST_TUNNEL_ADDRESS, REVERST_SERVER_NAME, REVERST_LOG).
const envPrefix = "REVERST_"

// Host header modes for --host-header; any other value is sent as is.
const (
	hostPreserve = "preserve"
	hostRewrite  = "rewrite"
)

// config is the command's configuration. Every field is set by a flag and
// by the environment variable envPrefix + its env tag; a flag given on the
// command line wins.
type config struct {
	Log             string        `env:"LOG" envDefault:"info"`
	TunnelAddress   string        `env:"TUNNEL_ADDRESS" envDefault:"127.0.0.1:7171"`
	Group           string        `env:"TUNNEL_GROUP"`
	ServerName      string        `env:"SERVER_NAME"`
	CAFile          string        `env:"CA_FILE"`
	Insecure        bool          `env:"INSECURE_SKIP_VERIFY"`
	Username        string        `env:"USERNAME"`
	Password        string        `env:"PASSWORD"`
	Token           string        `env:"TOKEN"`
	HostHeader      string        `env:"HOST_HEADER" envDefault:"preserve"`
	ShutdownTimeout time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"15s"`

	// target is the local service, from the arguments.
	target *url.URL
}

// option describes one setting: its flags, its env var and its help.
type option struct {
	short, long string
	env         string
	kind        string // value placeholder in the usage; "" for a switch
	def         string
	usage       string
	bind        func(fs *flag.FlagSet, name string)
}

func (c *config) options() []option {
	str := func(p *string) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.StringVar(p, name, *p, "") }
	}
	boolean := func(p *bool) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.BoolVar(p, name, *p, "") }
	}
	dur := func(p *time.Duration) func(*flag.FlagSet, string) {
		return func(fs *flag.FlagSet, name string) { fs.DurationVar(p, name, *p, "") }
	}
	return []option{
		{short: "a", long: "tunnel-address", env: "TUNNEL_ADDRESS", kind: "HOST:PORT", def: "127.0.0.1:7171", usage: "tunnel server (QUIC) address; a name is resolved to all its addresses and every one is joined", bind: str(&c.TunnelAddress)},
		{short: "g", long: "group", env: "TUNNEL_GROUP", kind: "NAME", usage: "tunnel group to join (required)", bind: str(&c.Group)},
		{short: "n", long: "server-name", env: "SERVER_NAME", kind: "NAME", def: "host of --tunnel-address", usage: "name the tunnel server's certificate must cover", bind: str(&c.ServerName)},
		{long: "ca", env: "CA_FILE", kind: "FILE", def: "system roots", usage: "PEM file of the CA certificates that verify the tunnel server", bind: str(&c.CAFile)},
		{long: "insecure", env: "INSECURE_SKIP_VERIFY", usage: "do not verify the tunnel server's certificate (DANGEROUS: credentials and traffic can be intercepted)", bind: boolean(&c.Insecure)},
		{short: "u", long: "username", env: "USERNAME", kind: "USER", usage: "basic authentication user name", bind: str(&c.Username)},
		{short: "p", long: "password", env: "PASSWORD", kind: "PASSWORD", usage: "basic authentication password (prefer the env var: flags show in ps)", bind: str(&c.Password)},
		{short: "t", long: "token", env: "TOKEN", kind: "TOKEN", usage: "bearer token (prefer the env var: flags show in ps)", bind: str(&c.Token)},
		{long: "host-header", env: "HOST_HEADER", kind: "MODE", def: hostPreserve, usage: "Host sent to the local service: preserve (the visitor's), rewrite (the target's) or a literal host", bind: str(&c.HostHeader)},
		{long: "shutdown-timeout", env: "SHUTDOWN_TIMEOUT", kind: "DURATION", def: "15s", usage: "time requests in flight get to finish on SIGINT/SIGTERM", bind: dur(&c.ShutdownTimeout)},
		{short: "l", long: "log", env: "LOG", kind: "LEVEL", def: "info", usage: "debug (logs every request), info, warn or error", bind: str(&c.Log)},
	}
}

// errUsage marks configuration errors: exit status 2.
var errUsage = errors.New("invalid configuration")

// parseConfig reads environ (nil meaning the process environment), then
// args. -h and --help print the usage to out and return flag.ErrHelp.
// Flags and the two arguments may come in any order.
func parseConfig(args []string, environ map[string]string, out io.Writer) (*config, error) {
	var c config
	opts := env.Options{Prefix: envPrefix}
	if environ != nil {
		opts.Environment = environ
	}
	if err := env.ParseWithOptions(&c, opts); err != nil {
		return nil, fmt.Errorf("%w: %w", errUsage, envError(err))
	}

	fs := flag.NewFlagSet("reverst-tunnel", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	options := c.options()
	for _, o := range options {
		if o.short != "" {
			o.bind(fs, o.short)
		}
		o.bind(fs, o.long)
	}
	var positional []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printUsage(out, options)
				return nil, err
			}
			return nil, fmt.Errorf("%w: %w (see reverst-tunnel -h)", errUsage, err)
		}
		rest = fs.Args()
		if len(rest) == 0 {
			break
		}
		positional, rest = append(positional, rest[0]), rest[1:]
	}
	if err := c.validate(positional); err != nil {
		return nil, fmt.Errorf("%w: %w (see reverst-tunnel -h)", errUsage, err)
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
	t := reflect.TypeFor[config]()
	var errs []error
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			if f, ok := t.FieldByName(pe.Name); ok {
				errs = append(errs, fmt.Errorf("%s%s: %w", envPrefix, f.Tag.Get("env"), pe.Err))
				continue
			}
		}
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

func (c *config) validate(args []string) error {
	var errs []error
	switch {
	case len(args) != 2 || args[0] != "http":
		errs = append(errs, fmt.Errorf("want the arguments: http PORT|HOST:PORT|URL, got %q", args))
	default:
		target, err := parseTarget(args[1])
		if err != nil {
			errs = append(errs, err)
		}
		c.target = target
	}
	if c.Group == "" {
		errs = append(errs, fmt.Errorf("missing the tunnel group (-g/--group or %sTUNNEL_GROUP)", envPrefix))
	}
	if _, _, err := net.SplitHostPort(c.TunnelAddress); err != nil {
		errs = append(errs, fmt.Errorf("--tunnel-address %q: %w", c.TunnelAddress, err))
	}
	if c.CAFile != "" && c.Insecure {
		errs = append(errs, errors.New("--ca and --insecure exclude each other"))
	}
	basic := c.Username != "" || c.Password != ""
	if basic && (c.Username == "" || c.Password == "") {
		errs = append(errs, errors.New("basic authentication needs both --username and --password"))
	}
	if basic && c.Token != "" {
		errs = append(errs, errors.New("give --username/--password or --token, not both"))
	}
	if c.HostHeader == "" {
		errs = append(errs, errors.New("--host-header: empty (use preserve, rewrite or a host)"))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--shutdown-timeout: must be positive, got %s", c.ShutdownTimeout))
	}
	if _, err := c.level(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// parseTarget reads the local service: a port (on localhost), HOST:PORT,
// or an http(s) URL whose path prefixes every request's.
func parseTarget(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		if !strings.Contains(s, ":") {
			s = "localhost:" + s
		}
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("target %q: %w", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("target %q: scheme must be http or https", s)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("target %q: no host", s)
	}
	if u.User != nil || u.Fragment != "" {
		return nil, fmt.Errorf("target %q: no user info or fragment allowed", s)
	}
	return u, nil
}

func (c *config) level() (slog.Level, error) {
	switch strings.ToLower(c.Log) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("--log (%sLOG): %q is not one of debug, info, warn, error", envPrefix, c.Log)
}

// tlsConfig verifies the tunnel server with --ca (or the system roots) as
// --server-name (or the host of the address, the client's default).
func (c *config) tlsConfig() (*tls.Config, error) {
	conf := &tls.Config{ServerName: c.ServerName, InsecureSkipVerify: c.Insecure} //nolint:gosec // an explicit, loudly logged choice
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca %s: no PEM certificate found", c.CAFile)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}

// authenticator presents the configured credentials, if any.
func (c *config) authenticator() client.Authenticator {
	switch {
	case c.Token != "":
		return client.BearerAuthenticator(c.Token)
	case c.Username != "":
		return client.BasicAuthenticator(c.Username, c.Password)
	}
	return nil
}

func printUsage(out io.Writer, options []option) {
	fmt.Fprint(out, `reverst-tunnel: expose a local HTTP service through a reverst tunnel group

USAGE
  reverst-tunnel [FLAGS] http TARGET

  TARGET is the local service: a port (8080 means http://localhost:8080),
  HOST:PORT, or an http:// or https:// URL whose path prefixes every
  request's. Requests arriving at the tunnel server for the group's hosts
  are proxied to it. Ctrl-C (SIGINT) or SIGTERM drains: the tunnel server is
  told to send no new requests, those in flight finish, then the command
  exits 0. It exits 1 when the tunnel server refuses the registration
  (unauthorized, not found, bad request) and 2 on a usage error; any other
  failure is retried for ever.

EXAMPLES
  REVERST_PASSWORD=pass reverst-tunnel -a tunnel.example.com:7171 -g app.example.com -u user http 8080
  REVERST_TOKEN=... reverst-tunnel -a reverst-headless.ns.svc:7171 -n tunnel.example.com -g g --ca ca.pem http localhost:3000

FLAGS
`)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, o := range options {
		name := "    --" + o.long
		if o.short != "" {
			name = "-" + o.short + ", --" + o.long
		}
		if o.kind != "" {
			name += " " + o.kind
		}
		usage := o.usage
		if o.def != "" {
			usage += " (default: " + o.def + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s [$%s%s]\n", name, usage, envPrefix, o.env)
	}
	_ = tw.Flush()
}
