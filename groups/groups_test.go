package groups

import (
	"strings"
	"testing"
)

func TestParseValid(t *testing.T) {
	cfg, err := Parse([]byte(`
groups:
  "flipt.dev.local":
    hosts: ["flipt.dev.local", "Other.Example:8080"]
    authentication:
      basic: {username: user, password: pass}
      bearer: {scheme: Token, hashedToken: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
      external: {scheme: JWT, endpoint: "http://auth.example/ext"}
  open:
    hosts: [open.example]
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Names(); len(got) != 2 || got[0] != "flipt.dev.local" || got[1] != "open" {
		t.Fatalf("names %v", got)
	}
	g := cfg.Groups["flipt.dev.local"]
	if g.Authentication.Basic.Username != "user" || g.Authentication.External.Scheme != "JWT" || g.Authentication.Open() {
		t.Fatalf("group %+v", g)
	}
	if !cfg.Groups["open"].Authentication.Open() {
		t.Fatal("group without authentication is not open")
	}
}

// No group at all is said explicitly, as an empty mapping.
func TestParseNoGroups(t *testing.T) {
	cfg, err := Parse([]byte("groups: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Groups) != 0 {
		t.Fatalf("groups %v", cfg.Names())
	}
}

func TestParseErrorsNameGroupAndField(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{"no hosts", `groups: {a: {hosts: []}}`, []string{`group "a"`, "hosts"}},
		{"empty host", `groups: {a: {hosts: [""]}}`, []string{`group "a"`, "hosts[0]"}},
		{"duplicate host across groups", `groups: {a: {hosts: [x.example]}, b: {hosts: [X.EXAMPLE:80]}}`, []string{`group "b"`, "hosts[0]", `group "a"`}},
		{"shared scheme", `groups: {a: {hosts: [a], authentication: {bearer: {token: t}, external: {endpoint: "http://e"}}}}`, []string{`group "a"`, "external.scheme", "Bearer"}},
		{"scheme case-insensitive", `groups: {a: {hosts: [a], authentication: {basic: {username: u, password: p}, bearer: {scheme: basic, token: t}}}}`, []string{"bearer.scheme"}},
		{"empty username", `groups: {a: {hosts: [a], authentication: {basic: {username: "", password: p}}}}`, []string{`group "a"`, "basic.username"}},
		{"empty password", `groups: {a: {hosts: [a], authentication: {basic: {username: u}}}}`, []string{"basic.password"}},
		{"empty token", `groups: {a: {hosts: [a], authentication: {bearer: {token: ""}}}}`, []string{"authentication.bearer", "required"}},
		{"two tokens", `groups: {a: {hosts: [a], authentication: {bearer: {token: t, tokenPath: /p}}}}`, []string{"only one"}},
		{"bad hashed token", `groups: {a: {hosts: [a], authentication: {bearer: {hashedToken: xyz}}}}`, []string{"bearer.hashedToken", "SHA-256"}},
		{"bad endpoint", `groups: {a: {hosts: [a], authentication: {external: {endpoint: "ftp://x"}}}}`, []string{"external.endpoint"}},
		{"endpoint without host", `groups: {a: {hosts: [a], authentication: {external: {endpoint: "https:///ext"}}}}`, []string{"external.endpoint"}},
		{"unknown field", `groups: {a: {hosts: [a], authentication: {basci: {}}}}`, []string{"basci"}},
		{"bad wildcard", `groups: {a: {hosts: ["a.*.example"]}}`, []string{"hosts[0]", "wildcard"}},
		{"bare star", `groups: {a: {hosts: ["*"]}}`, []string{"hosts[0]"}},
		// A URL is no host: without the check its scheme would read as
		// the host ("http") and its host as a port.
		{"url as host", `groups: {a: {hosts: ["http://a.example"]}}`, []string{`group "a"`, "hosts[0]", "not a host name"}},
		{"url with port as host", `groups: {a: {hosts: ["https://a.example:443/"]}}`, []string{"hosts[0]", "not a host name"}},
		{"path after port", `groups: {a: {hosts: ["a.example:80/x"]}}`, []string{"hosts[0]", "not a host name"}},
		{"same host in unicode and punycode", `groups: {a: {hosts: ["bücher.example"]}, b: {hosts: ["xn--bcher-kva.example"]}}`, []string{`group "b"`, "already routed"}},
		{"same wildcard in unicode and punycode", `groups: {a: {hosts: ["*.bücher.example"]}, b: {hosts: ["*.xn--bcher-kva.example"]}}`, []string{`group "b"`, "already routed"}},
		// A strategy left without a value (its fields commented out)
		// decodes to nil, as if it were absent: the group would be open.
		{"strategy without value", "groups:\n  a:\n    hosts: [a]\n    authentication:\n      bearer:\n        # token: secret\n", []string{`group "a"`, "authentication.bearer", "empty"}},
		{"basic null", `groups: {a: {hosts: [a], authentication: {basic: ~}}}`, []string{`group "a"`, "authentication.basic"}},
		{"external null", `groups: {a: {hosts: [a], authentication: {basic: {username: u, password: p}, external: null}}}`, []string{`group "a"`, "authentication.external"}},
		{"authentication without value", "groups:\n  a:\n    hosts: [a]\n    authentication:\n", []string{`group "a"`, "authentication", "empty"}},
		{"typo at top", `group: {}`, []string{"group"}},
		// What a file cut short while being written looks like.
		{"groups without value", "groups:\n", []string{"no group listed", "groups: {}"}},
		{"group named ~", "groups:\n  a:\n    hosts: [a]\n  ~:\n    hosts: [b]\n", []string{"line 4", `"~"`, "null", "quote"}},
		{"group named null", `groups: {null: {hosts: [b]}}`, []string{`"null"`, "quote"}},
		{"group named empty", `groups: {"": {hosts: [b]}}`, []string{`group ""`, "name", "must not be empty"}},
		{"second document", "groups: {a: {hosts: [a]}}\n---\ngroups: {b: {hosts: [b]}}\n", []string{"more than one YAML document"}},
		{"empty", ``, []string{"empty"}},
		{"not yaml", `groups: [`, []string{"groups"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml))
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestNormalizeHost(t *testing.T) {
	for in, want := range map[string]string{
		"Example.COM":      "example.com",
		"example.com:8181": "example.com",
		"example.com.":     "example.com",
		"[::1]:80":         "::1",
		"[::1]":            "::1",
		" x ":              "x",
		"Bücher.Example":   "xn--bcher-kva.example",
		"*.Example.com":    "*.example.com",
		"[svc.example]":    "[svc.example]",
		"[svc.example]:80": "[svc.example]",
		// Browsers send IDNs in punycode, so a wildcard over one must
		// be kept in that form too, or it never matches.
		"*.Bücher.example": "*.xn--bcher-kva.example",
	} {
		if got := NormalizeHost(in); got != want {
			t.Errorf("NormalizeHost(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("groups: {a: {hosts: [a.example], authentication: {basic: {username: u, password: p}}}}"))
	f.Add([]byte("groups:\n  a:\n    hosts: [x]\n  b:\n    hosts: [y]\n"))
	f.Add([]byte("groups: {a: {hosts: [a], authentication: {bearer: {hashedToken: 00}}}}"))
	f.Fuzz(func(t *testing.T, in []byte) {
		cfg, err := Parse(in)
		if err != nil {
			return
		}
		// Whatever is accepted is valid: every group routes at least one
		// host, and no host belongs to two groups.
		seen := map[string]string{}
		for name, g := range cfg.Groups {
			if len(g.Hosts) == 0 {
				t.Fatalf("group %q accepted without hosts", name)
			}
			for _, h := range g.Hosts {
				n := NormalizeHost(h)
				if other, dup := seen[n]; dup && other != name {
					t.Fatalf("host %q in %q and %q", n, other, name)
				}
				seen[n] = name
			}
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted, then invalid: %v", err)
		}
	})
}

// TestEndpointErrorHidesCredentials: validation errors reach the logs and
// the unauthenticated /readyz body, so a malformed endpoint must not be
// quoted with its user info or query (auth never names one so either).
func TestEndpointErrorHidesCredentials(t *testing.T) {
	for _, ep := range []string{
		"https//user:hunter2@auth.example/x?token=s3cret",
		"ftp://user:hunter2@auth.example/x?token=s3cret",
		"https://user:hunter2@/x?token=s3cret",
		"https://user:hunter2@auth.example:port/x?token=s3cret",
	} {
		_, err := Parse([]byte(`groups: {a: {hosts: [a], authentication: {external: {endpoint: "` + ep + `"}}}}`))
		if err == nil {
			t.Fatalf("%q accepted", ep)
		}
		if !strings.Contains(err.Error(), `group "a"`) || !strings.Contains(err.Error(), "external.endpoint") {
			t.Errorf("error %q does not name the group and field", err)
		}
		if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("error %q quotes the endpoint's credentials", err)
		}
	}
}

// TestTypeErrorHidesValue: a token written straight under its strategy
// ("bearer: TOKEN") is a type error, and yaml quotes the value in it (up
// to 10 bytes whole, else the first 7); such errors reach the logs and
// the unauthenticated /readyz body, so the value must not be in them.
func TestTypeErrorHidesValue(t *testing.T) {
	for _, def := range []string{
		`groups: {a: {hosts: [a], authentication: {bearer: s3cret}}}`,
		`groups: {a: {hosts: [a], authentication: {basic: "s3cret:pw"}}}`,
		`groups: {a: {hosts: [a], authentication: {external: "s3cret-with-into x"}}}`,
		"groups:\n  a:\n    hosts: [a]\n    authentication: s3cretlongertoken\n",
	} {
		_, err := Parse([]byte(def))
		if err == nil {
			t.Fatalf("%q accepted", def)
		}
		if strings.Contains(err.Error(), "s3cr") {
			t.Errorf("error %q quotes the value", err)
		}
		if !strings.Contains(err.Error(), "line ") || !strings.Contains(err.Error(), "cannot unmarshal !!str into groups.") {
			t.Errorf("error %q no longer says where and what", err)
		}
	}
}

// TestParseEmptyTrailingDocument: a lone "---" after the definition (the
// separator generated manifests and concatenating tools leave, or an
// example commented out under it) starts a document with nothing in it.
// Such files loaded before multi-document definitions were refused, and
// must still load, or the server no longer starts on them.
func TestParseEmptyTrailingDocument(t *testing.T) {
	for _, def := range []string{
		"groups: {a: {hosts: [a]}}\n---\n",
		"---\ngroups: {a: {hosts: [a]}}\n---\n# groups: {b: {hosts: [b]}}\n",
		"groups: {a: {hosts: [a]}}\n---\n~\n---\n",
	} {
		c, err := Parse([]byte(def))
		if err != nil {
			t.Errorf("%q: %v", def, err)
			continue
		}
		if len(c.Groups) != 1 {
			t.Errorf("%q: groups %v, want a", def, c.Groups)
		}
	}
}
