package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
)

// outcome is what a test expects of Authenticate.
type outcome int

const (
	allow outcome = iota
	deny
	fail // an error that is not a denial
)

func (o outcome) String() string { return [...]string{"allow", "deny", "fail"}[o] }

func outcomeOf(err error) outcome {
	switch {
	case err == nil:
		return allow
	case errors.Is(err, protocol.ErrUnauthorized):
		return deny
	default:
		return fail
	}
}

func basicCred(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

func hexDigest(s string) string {
	d := sha256.Sum256([]byte(s))
	return hex.EncodeToString(d[:])
}

func md(auth string) map[string]string { return map[string]string{"Authorization": auth} }

func TestStatic(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	hashedFile := filepath.Join(dir, "hashed")
	emptyFile := filepath.Join(dir, "empty")
	badHashFile := filepath.Join(dir, "badhash")
	for name, content := range map[string]string{
		tokenFile:   "file-token\n",
		hashedFile:  strings.ToUpper(hexDigest("hashed-file-token")) + "\r\n",
		emptyFile:   "\n",
		badHashFile: "not-hex\n",
	} {
		if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	basic := groups.Authentication{Basic: &groups.Basic{Username: "user", Password: "pa:ss"}}
	bearer := func(b groups.Bearer) groups.Authentication { return groups.Authentication{Bearer: &b} }
	both := groups.Authentication{
		Basic:  &groups.Basic{Username: "user", Password: "pa:ss"},
		Bearer: &groups.Bearer{Scheme: "Token", Token: "tok"},
	}

	tests := []struct {
		name     string
		auth     groups.Authentication
		metadata map[string]string
		want     outcome
	}{
		{"open group, no credentials", groups.Authentication{}, nil, allow},
		{"open group, any credentials", groups.Authentication{}, md("Bearer whatever"), allow},

		{"basic ok", basic, md(basicCred("user", "pa:ss")), allow},
		{"basic scheme case-insensitive", basic, md("bASIC " + base64.StdEncoding.EncodeToString([]byte("user:pa:ss"))), allow},
		{"basic metadata key case-insensitive", basic, map[string]string{"authorization": basicCred("user", "pa:ss")}, allow},
		{"basic extra spaces", basic, md("Basic   " + base64.StdEncoding.EncodeToString([]byte("user:pa:ss")) + " "), allow},
		{"basic wrong password", basic, md(basicCred("user", "pa:sS")), deny},
		{"basic password prefix", basic, md(basicCred("user", "pa")), deny},
		{"basic wrong user", basic, md(basicCred("User", "pa:ss")), deny},
		{"basic empty password", basic, md(basicCred("user", "")), deny},
		{"basic malformed base64", basic, md("Basic dXNlcjpwYTpzcw=!"), deny},
		{"basic no colon", basic, md("Basic " + base64.StdEncoding.EncodeToString([]byte("userpass"))), deny},
		{"basic no payload", basic, md("Basic"), deny},
		{"basic wrong scheme", basic, md("Bearer " + base64.StdEncoding.EncodeToString([]byte("user:pa:ss"))), deny},
		{"basic no credentials", basic, nil, deny},
		{"basic other metadata only", basic, map[string]string{"X": "y"}, deny},
		{"basic empty authorization", basic, md("  "), deny},

		{"token ok", bearer(groups.Bearer{Token: "tok"}), md("Bearer tok"), allow},
		{"token scheme lower case", bearer(groups.Bearer{Token: "tok"}), md("bearer tok"), allow},
		{"token wrong", bearer(groups.Bearer{Token: "tok"}), md("Bearer tok2"), deny},
		{"token prefix", bearer(groups.Bearer{Token: "tok"}), md("Bearer to"), deny},
		{"token empty", bearer(groups.Bearer{Token: "tok"}), md("Bearer "), deny},
		{"token wrong scheme", bearer(groups.Bearer{Token: "tok"}), md("Basic tok"), deny},
		{"token as scheme", bearer(groups.Bearer{Token: "tok"}), md("tok"), deny},
		{"token custom scheme", bearer(groups.Bearer{Scheme: "JWT", Token: "tok"}), md("jwt tok"), allow},
		{"token custom scheme, default presented", bearer(groups.Bearer{Scheme: "JWT", Token: "tok"}), md("Bearer tok"), deny},
		{"hashed ok", bearer(groups.Bearer{HashedToken: hexDigest("tok")}), md("Bearer tok"), allow},
		{"hashed upper-case hex", bearer(groups.Bearer{HashedToken: strings.ToUpper(hexDigest("tok"))}), md("Bearer tok"), allow},
		{"hashed wrong", bearer(groups.Bearer{HashedToken: hexDigest("tok")}), md("Bearer tok2"), deny},
		{"hashed presenting the digest", bearer(groups.Bearer{HashedToken: hexDigest("tok")}), md("Bearer " + hexDigest("tok")), deny},
		{"token path ok", bearer(groups.Bearer{TokenPath: tokenFile}), md("Bearer file-token"), allow},
		{"token path keeps no newline", bearer(groups.Bearer{TokenPath: tokenFile}), md("Bearer file-token\n"), allow},
		{"token path wrong", bearer(groups.Bearer{TokenPath: tokenFile}), md("Bearer file-token2"), deny},
		{"token path missing", bearer(groups.Bearer{TokenPath: filepath.Join(dir, "missing")}), md("Bearer x"), fail},
		{"token path empty file", bearer(groups.Bearer{TokenPath: emptyFile}), md("Bearer x"), fail},
		{"token path k8s without reader", bearer(groups.Bearer{TokenPath: "k8s://secret/ns/name/key"}), md("Bearer x"), fail},
		{"hashed path ok", bearer(groups.Bearer{HashedTokenPath: hashedFile}), md("Bearer hashed-file-token"), allow},
		{"hashed path wrong", bearer(groups.Bearer{HashedTokenPath: hashedFile}), md("Bearer nope"), deny},
		{"hashed path not hex", bearer(groups.Bearer{HashedTokenPath: badHashFile}), md("Bearer not-hex"), fail},

		{"mixed, basic", both, md(basicCred("user", "pa:ss")), allow},
		{"mixed, token", both, md("token tok"), allow},
		{"mixed, token under basic", both, md("Basic tok"), deny},
		{"mixed, unknown scheme", both, md("Bearer tok"), deny},
	}
	f := &Factory{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := f.New(tt.auth)
			if err != nil {
				t.Fatal(err)
			}
			err = a.Authenticate(t.Context(), tt.metadata)
			if got := outcomeOf(err); got != tt.want {
				t.Fatalf("got %v (%v), want %v", got, err, tt.want)
			}
		})
	}
}

func TestTokenPathRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	write := func(s string) {
		t.Helper()
		// Written aside and renamed, as Kubernetes and editors do.
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write("old\n")
	a, err := (&Factory{}).New(groups.Authentication{Bearer: &groups.Bearer{TokenPath: path}})
	if err != nil {
		t.Fatal(err)
	}
	check := func(tok string, want outcome) {
		t.Helper()
		if got := outcomeOf(a.Authenticate(t.Context(), md("Bearer "+tok))); got != want {
			t.Fatalf("token %q: got %v, want %v", tok, got, want)
		}
	}
	check("old", allow)
	check("new", deny)
	write("new\n")
	check("old", deny)
	check("new", allow)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	check("new", fail)
}

func TestReadSecretHook(t *testing.T) {
	var gotPath string
	f := &Factory{ReadSecret: func(ctx context.Context, path string) ([]byte, error) {
		gotPath = path
		return []byte("k8s-token\n"), nil
	}}
	a, err := f.New(groups.Authentication{Bearer: &groups.Bearer{TokenPath: "k8s://secret/ns/name/key"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Authenticate(t.Context(), md("Bearer k8s-token")); err != nil {
		t.Fatalf("allow: %v", err)
	}
	if gotPath != "k8s://secret/ns/name/key" {
		t.Fatalf("ReadSecret got path %q", gotPath)
	}
}

func TestNewRejectsBadDefinitions(t *testing.T) {
	const secret = "deadbeef-secret-token"
	tests := []struct {
		name string
		auth groups.Authentication
	}{
		{"hashed token not hex", groups.Authentication{Bearer: &groups.Bearer{HashedToken: secret}}},
		{"hashed token short", groups.Authentication{Bearer: &groups.Bearer{HashedToken: "deadbeef"}}},
		{"bearer empty", groups.Authentication{Bearer: &groups.Bearer{}}},
		{"basic empty password", groups.Authentication{Basic: &groups.Basic{Username: secret}}},
		{"shared scheme", groups.Authentication{
			Basic:  &groups.Basic{Username: "u", Password: secret},
			Bearer: &groups.Bearer{Scheme: "basic", Token: secret},
		}},
		{"scheme with space", groups.Authentication{Bearer: &groups.Bearer{Scheme: "a b", Token: secret}}},
		{"external not a URL", groups.Authentication{External: &groups.External{Endpoint: "ftp://" + secret + "@x/"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := (&Factory{}).New(tt.auth)
			if err == nil {
				t.Fatal("New succeeded")
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error leaks the secret: %v", err)
			}
		})
	}
}
