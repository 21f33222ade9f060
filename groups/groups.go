// Package groups is the model of a tunnel groups definition: the YAML that
// names each group, the hosts routed to it and how its members authenticate.
// Parse decodes and validates a whole definition; a definition that does not
// validate is rejected as a whole, with an error naming the group and field.
//
//	groups:
//	  "flipt.dev.local":
//	    hosts: ["flipt.dev.local"]
//	    authentication:
//	      basic:    {username: "user", password: "pass"}
//	      bearer:   {token: "some-token"}
//	      external: {scheme: "JWT", endpoint: "http://auth.example/ext"}
package groups

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
	"golang.org/x/net/idna"
)

// Default schemes of the authentication strategies.
const (
	SchemeBasic    = "Basic"
	SchemeBearer   = "Bearer"
	SchemeExternal = "Bearer"
)

// Config is a whole groups definition.
type Config struct {
	Groups map[string]Group `yaml:"groups"`
}

// Group is one tunnel group.
type Group struct {
	// Hosts are the Host values (without port) routed to the group.
	Hosts []string `yaml:"hosts"`
	// Authentication of registrations; the zero value is an open group.
	Authentication Authentication `yaml:"authentication"`
}

// Authentication holds a group's strategies; a client's credentials are
// checked by the strategy whose scheme they present.
type Authentication struct {
	Basic    *Basic    `yaml:"basic,omitempty"`
	Bearer   *Bearer   `yaml:"bearer,omitempty"`
	External *External `yaml:"external,omitempty"`
}

// Basic is username and password authentication (scheme "Basic").
type Basic struct {
	Scheme   string `yaml:"scheme,omitempty"`
	Username string `yaml:"username"`
	Password string `yaml:"password"`
}

// Bearer is static token authentication (scheme "Bearer"). Exactly one of
// the token fields is set. Paths are files, or k8s://secret/NS/NAME/KEY.
type Bearer struct {
	Scheme          string `yaml:"scheme,omitempty"`
	Token           string `yaml:"token,omitempty"`
	TokenPath       string `yaml:"tokenPath,omitempty"`
	HashedToken     string `yaml:"hashedToken,omitempty"`
	HashedTokenPath string `yaml:"hashedTokenPath,omitempty"`
}

// External delegates the decision to an HTTP endpoint (scheme "Bearer").
type External struct {
	Scheme   string `yaml:"scheme,omitempty"`
	Endpoint string `yaml:"endpoint"`
}

// Open reports whether the group accepts any client.
func (a Authentication) Open() bool {
	return a.Basic == nil && a.Bearer == nil && a.External == nil
}

// SchemeOr returns scheme, or def when scheme is empty.
func SchemeOr(scheme, def string) string {
	if scheme == "" {
		return def
	}
	return scheme
}

// Parse decodes and validates a YAML definition. Unknown fields are errors,
// so that a typo never silently opens a group.
func Parse(data []byte) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("groups: empty definition")
		}
		var te *yaml.TypeError
		if errors.As(err, &te) {
			for i, msg := range te.Errors {
				te.Errors[i] = quotedValue.ReplaceAllString(msg, "$1 into $2")
			}
		}
		return nil, fmt.Errorf("groups: %w", err)
	}
	// A second document ("---" and more groups, two files concatenated)
	// would otherwise be left out without a word. Empty ones (a trailing
	// "---", maybe followed by comments) hold nothing to leave out, and
	// files ending so loaded before.
	for {
		var extra yaml.Node
		err := dec.Decode(&extra)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil || !isNull(&extra) {
			return nil, errors.New("groups: more than one YAML document; put every group under one groups key")
		}
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("groups: %w", err)
	}
	if err := errors.Join(append(append(nullGroups(&doc), emptyAuthentication(&doc)...), cfg.Validate())...); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// nullGroups finds what decodes to no group without an error: "groups:"
// with nothing under it, which is what a file cut short while being
// written looks like (no group at all is "groups: {}"), and a group named
// "~" or "null", which YAML reads as no name.
func nullGroups(doc *yaml.Node) []error {
	defs, ok := mapping(doc)["groups"]
	if !ok {
		return nil
	}
	if isNull(defs) {
		return []error{errors.New(`groups: no group listed; write "groups: {}" for none`)}
	}
	var errs []error
	if n := resolve(defs); n.Kind == yaml.MappingNode {
		for i := 0; i < len(n.Content); i += 2 {
			if k := n.Content[i]; isNull(k) {
				errs = append(errs, fmt.Errorf("groups: line %d: group name %q reads as null in YAML; quote it", k.Line, k.Value))
			}
		}
	}
	return errs
}

// emptyAuthentication finds the authentication keys, and the strategies
// under them, given without a value: "bearer:" with its fields commented
// out decodes to nil, as if it were absent, and would silently leave the
// group open to anyone.
func emptyAuthentication(doc *yaml.Node) []error {
	var errs []error
	defs := mapping(lookup(doc, "groups"))
	for _, name := range slices.Sorted(maps.Keys(defs)) {
		a, ok := mapping(defs[name])["authentication"]
		switch {
		case !ok:
			continue
		case isNull(a):
			errs = append(errs, fmt.Errorf("group %q: authentication: must not be empty (leave it out for an open group)", name))
			continue
		}
		strategies := mapping(a)
		for _, strategy := range slices.Sorted(maps.Keys(strategies)) {
			if isNull(strategies[strategy]) {
				errs = append(errs, fmt.Errorf("group %q: authentication.%s: must not be empty", name, strategy))
			}
		}
	}
	return errs
}

// resolve follows n through its document and alias nodes.
func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && (n.Kind == yaml.DocumentNode || n.Kind == yaml.AliasNode) {
		if n.Kind == yaml.AliasNode {
			n = n.Alias
		} else if len(n.Content) == 1 {
			n = n.Content[0]
		} else {
			return nil
		}
	}
	return n
}

// mapping returns the entries of a mapping node by their scalar keys; nil
// for anything else.
func mapping(n *yaml.Node) map[string]*yaml.Node {
	n = resolve(n)
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	m := make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		if k := resolve(n.Content[i]); k != nil && k.Kind == yaml.ScalarNode {
			m[k.Value] = n.Content[i+1]
		}
	}
	return m
}

func lookup(n *yaml.Node, key string) *yaml.Node { return mapping(n)[key] }

func isNull(n *yaml.Node) bool {
	n = resolve(n)
	return n == nil || (n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null")
}

// quotedValue matches yaml's "line N: cannot unmarshal !!str `VALUE` into
// TYPE", whose VALUE may be a secret put where a mapping belongs ("bearer:
// TOKEN"): these errors reach the logs and /readyz.
var quotedValue = regexp.MustCompile(`(?s)^(line \d+: cannot unmarshal \S+) .* into (\S+)$`)

// Validate checks the definition, naming the group and field at fault.
func (c *Config) Validate() error {
	var errs []error
	owner := map[string]string{}
	for _, name := range c.Names() {
		g := c.Groups[name]
		fail := func(field, format string, args ...any) {
			errs = append(errs, fmt.Errorf("group %q: %s: %s", name, field, fmt.Sprintf(format, args...)))
		}
		if strings.TrimSpace(name) == "" {
			fail("name", "must not be empty")
		}
		if len(g.Hosts) == 0 {
			fail("hosts", "at least one host is required")
		}
		for i, h := range g.Hosts {
			norm := NormalizeHost(h)
			field := fmt.Sprintf("hosts[%d]", i)
			prev, seen := owner[norm]
			switch {
			case norm == "":
				fail(field, "must not be empty")
			// The raw value too: NormalizeHost drops what follows the
			// last colon as a port, and "http://x" would read as "http".
			case strings.ContainsAny(strings.TrimSpace(h), "/ \t@") || strings.ContainsAny(norm, "/ \t@") || (strings.Contains(norm, "*") && !isWildcard(norm)):
				fail(field, "%q is not a host name (a wildcard is \"*.\" followed by a domain)", h)
			case seen && prev == name:
				fail(field, "host %q is listed twice", h)
			case seen:
				fail(field, "host %q is already routed to group %q", h, prev)
			default:
				owner[norm] = name
			}
		}
		errs = append(errs, g.Authentication.validate(name)...)
	}
	return errors.Join(errs...)
}

func (a Authentication) validate(group string) []error {
	var errs []error
	fail := func(field, msg string) {
		errs = append(errs, fmt.Errorf("group %q: authentication.%s: %s", group, field, msg))
	}
	schemes := map[string]string{}
	scheme := func(strategy, s, def string) {
		s = SchemeOr(s, def)
		if strings.ContainsAny(s, " \t") {
			fail(strategy+".scheme", fmt.Sprintf("%q must be a single word", s))
			return
		}
		key := strings.ToLower(s)
		if other, ok := schemes[key]; ok {
			fail(strategy+".scheme", fmt.Sprintf("scheme %q is already used by %s", s, other))
			return
		}
		schemes[key] = strategy
	}
	if b := a.Basic; b != nil {
		scheme("basic", b.Scheme, SchemeBasic)
		if b.Username == "" {
			fail("basic.username", "must not be empty")
		}
		if strings.Contains(b.Username, ":") {
			fail("basic.username", "must not contain ':'")
		}
		if b.Password == "" {
			fail("basic.password", "must not be empty")
		}
	}
	if b := a.Bearer; b != nil {
		scheme("bearer", b.Scheme, SchemeBearer)
		set := 0
		for _, v := range []string{b.Token, b.TokenPath, b.HashedToken, b.HashedTokenPath} {
			if v != "" {
				set++
			}
		}
		switch {
		case set == 0:
			fail("bearer", "one of token, tokenPath, hashedToken or hashedTokenPath is required")
		case set > 1:
			fail("bearer", "only one of token, tokenPath, hashedToken or hashedTokenPath may be set")
		case b.HashedToken != "":
			if err := ValidateHashedToken(b.HashedToken); err != nil {
				fail("bearer.hashedToken", err.Error())
			}
		}
	}
	if e := a.External; e != nil {
		scheme("external", e.Scheme, SchemeExternal)
		if e.Endpoint == "" {
			fail("external.endpoint", "must not be empty")
		} else if u, err := url.Parse(e.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			// Not quoted: these errors reach the logs and /readyz, and an
			// endpoint may carry credentials in its user info or query.
			fail("external.endpoint", "must be an absolute http(s) URL with a host")
		}
	}
	return errs
}

// ValidateHashedToken checks that s is a hex SHA-256 digest.
func ValidateHashedToken(s string) error {
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != 32 {
		return errors.New("must be a hex SHA-256 digest (64 hex digits)")
	}
	return nil
}

// Names returns the group names in sorted order.
func (c *Config) Names() []string {
	names := make([]string, 0, len(c.Groups))
	for n := range c.Groups {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// NormalizeHost returns the form in which hosts are compared: without port
// or trailing dot, lower-case, and internationalised names in their ASCII
// (punycode) form, so that "Bücher.example" and "xn--bcher-kva.example"
// are one host.
func NormalizeHost(host string) string {
	host = strings.TrimSpace(host)
	bracketed := strings.HasPrefix(host, "[")
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if bracketed && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if bracketed && net.ParseIP(host) == nil {
		// Only an IP literal goes in brackets: "[svc.example]" is no
		// name of svc.example's.
		return "[" + strings.ToLower(host) + "]"
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if !isASCII(host) {
		// The wildcard label is no valid IDNA label, so it would make the
		// whole conversion fail and leave a wildcard in unicode, which no
		// visitor's (punycode) Host ever matches: convert what follows it.
		name, wild := strings.CutPrefix(host, "*.")
		if a, err := idna.Lookup.ToASCII(name); err == nil {
			host = a
			if wild {
				host = "*." + a
			}
		}
	}
	return host
}

func isASCII(s string) bool {
	for i := range len(s) {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func isWildcard(host string) bool {
	suffix, ok := Wildcard(host)
	return ok && !strings.Contains(suffix, "*")
}

// Wildcard reports whether host (normalised) is a wildcard entry such as
// "*.example.com", and returns its suffix (".example.com"). A wildcard
// matches any host that ends with the suffix, at any depth; an exact entry
// and then the longest matching suffix win.
func Wildcard(host string) (suffix string, ok bool) {
	if rest, found := strings.CutPrefix(host, "*."); found && rest != "" {
		return host[1:], true
	}
	return "", false
}
