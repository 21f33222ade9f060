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
	"strings"
	"time"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/flagenv"
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
	QUICOnly        bool          `env:"QUIC_ONLY"`
	ShutdownTimeout time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"15s"`

	// target is the local service, from the arguments.
	target *url.URL
}

func options() []flagenv.Option {
	return []flagenv.Option{
		{Short: "a", Long: "tunnel-address", Field: "TunnelAddress", Kind: "HOST:PORT", Usage: "tunnel server (QUIC) address; a name is resolved to all its addresses and every one is joined"},
		{Short: "g", Long: "group", Field: "Group", Kind: "NAME", Usage: "tunnel group to join (required)"},
		{Short: "n", Long: "server-name", Field: "ServerName", Kind: "NAME", Default: "host of --tunnel-address", Usage: "name the tunnel server's certificate must cover"},
		{Long: "ca", Field: "CAFile", Kind: "FILE", Default: "system roots", Usage: "PEM file of the CA certificates that verify the tunnel server"},
		{Long: "insecure", Field: "Insecure", Usage: "do not verify the tunnel server's certificate (DANGEROUS: credentials and traffic can be intercepted)"},
		{Short: "u", Long: "username", Field: "Username", Kind: "USER", Usage: "basic authentication user name"},
		{Short: "p", Long: "password", Field: "Password", Kind: "PASSWORD", Usage: "basic authentication password (prefer the env var: flags show in ps)"},
		{Short: "t", Long: "token", Field: "Token", Kind: "TOKEN", Usage: "bearer token (prefer the env var: flags show in ps)"},
		{Long: "host-header", Field: "HostHeader", Kind: "MODE", Usage: "Host sent to the local service: preserve (the visitor's), rewrite (the target's) or a literal host"},
		{Long: "quic-only", Field: "QUICOnly", Usage: "carry every request over QUIC, opening no TCP data connections to the tunnel server"},
		{Long: "shutdown-timeout", Field: "ShutdownTimeout", Usage: "time requests in flight get to finish on SIGINT/SIGTERM"},
		{Short: "l", Long: "log", Field: "Log", Kind: "LEVEL", Usage: "debug (logs every request), info, warn or error"},
	}
}

// errUsage marks configuration errors: exit status 2.
var errUsage = flagenv.ErrUsage

// parseConfig reads environ (nil meaning the process environment), then
// args. -h and --help print the usage to out and return flag.ErrHelp.
// Flags and the two arguments may come in any order.
func parseConfig(args []string, environ map[string]string, out io.Writer) (*config, error) {
	var c config
	set := &flagenv.Set{Command: "reverst-tunnel", Prefix: envPrefix, Settings: &c, Options: options()}
	positional, err := set.Parse(args, environ)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(out, usageHeader)
		set.PrintFlags(out)
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	if err := c.validate(positional, set.Name); err != nil {
		return nil, fmt.Errorf("%w: %w (see reverst-tunnel -h)", errUsage, err)
	}
	return &c, nil
}

// validate checks the settings; name names a setting in messages.
func (c *config) validate(args []string, name func(long string) string) error {
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
		errs = append(errs, fmt.Errorf("missing the tunnel group: -g/%s", name("group")))
	}
	if host, port, err := net.SplitHostPort(c.TunnelAddress); err != nil {
		errs = append(errs, fmt.Errorf("%s %q: %w", name("tunnel-address"), c.TunnelAddress, err))
	} else if host == "" {
		// ":7171" as the server listens: the client needs a host to dial.
		errs = append(errs, fmt.Errorf("%s %q: missing host", name("tunnel-address"), c.TunnelAddress))
	} else if _, err := net.LookupPort("udp", port); err != nil {
		errs = append(errs, fmt.Errorf("%s %q: %w", name("tunnel-address"), c.TunnelAddress, err))
	}
	if c.CAFile != "" && c.Insecure {
		errs = append(errs, fmt.Errorf("%s and %s exclude each other", name("ca"), name("insecure")))
	}
	basic := c.Username != "" || c.Password != ""
	if basic && (c.Username == "" || c.Password == "") {
		errs = append(errs, fmt.Errorf("basic authentication needs both %s and %s", name("username"), name("password")))
	}
	if basic && c.Token != "" {
		errs = append(errs, fmt.Errorf("give %s and %s, or %s, not both", name("username"), name("password"), name("token")))
	}
	if c.HostHeader == "" {
		errs = append(errs, fmt.Errorf("%s: empty (use preserve, rewrite or a host)", name("host-header")))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("%s: must be positive, got %s", name("shutdown-timeout"), c.ShutdownTimeout))
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
	// url.Parse takes any digits as a port; one out of range would only
	// show as a 502 on every request.
	if p := u.Port(); p != "" {
		if _, err := net.LookupPort("tcp", p); err != nil {
			return nil, fmt.Errorf("target %q: %w", s, err)
		}
	}
	return u, nil
}

func (c *config) level() (slog.Level, error) {
	l, err := flagenv.Level(c.Log)
	if err != nil {
		return 0, fmt.Errorf("--log (%sLOG): %w", envPrefix, err)
	}
	return l, nil
}

// tlsConfig verifies the tunnel server with --ca (or the system roots) as
// --server-name (or the host of the address, the client's default).
func (c *config) tlsConfig() (*tls.Config, error) {
	conf := &tls.Config{ServerName: c.ServerName, InsecureSkipVerify: c.Insecure} //nolint:gosec // an explicit, loudly logged choice
	if c.CAFile != "" {
		// Named as flagenv names settings: the flag and the variable.
		name := fmt.Sprintf("--ca (%sCA_FILE)", envPrefix)
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s %q: no PEM certificate found, want a PEM file of CA certificates", name, c.CAFile)
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

const usageHeader = `reverst-tunnel: expose a local HTTP service through a reverst tunnel group

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
`
