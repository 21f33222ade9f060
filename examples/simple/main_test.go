package main

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/groups"
)

// The walkthrough depends on these files agreeing with each other and with
// the flags' defaults.

func TestGroupFile(t *testing.T) {
	data, err := os.ReadFile("group.yml")
	if err != nil {
		t.Fatal(err)
	}
	conf, err := groups.Parse(data)
	if err != nil {
		t.Fatalf("group.yml: %v", err)
	}
	g, ok := conf.Groups["flipt.dev.local"]
	if !ok {
		t.Fatalf("group.yml has no group flipt.dev.local: %+v", conf.Groups)
	}
	if !slices.Equal(g.Hosts, []string{"flipt.dev.local"}) {
		t.Errorf("hosts = %q", g.Hosts)
	}
	if b := g.Authentication.Basic; b == nil || b.Username != "user" || b.Password != "pass" {
		t.Errorf("basic authentication = %+v, want user/pass", b)
	}
}

func TestCertificate(t *testing.T) {
	pair, err := tls.LoadX509KeyPair("server.crt", "server.key")
	if err != nil {
		t.Fatalf("server.crt/server.key: %v", err)
	}
	roots, err := loadCA("server.crt", false)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"flipt.dev.local", "localhost", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("verifying for %s with server.crt as CA: %v", name, err)
		}
	}
	if left := time.Until(leaf.NotAfter); left < 50*365*24*time.Hour {
		t.Errorf("certificate expires in %v; the demo should not rot", left)
	}
}

func TestInvalidFlags(t *testing.T) {
	for _, args := range [][]string{{"--log", "loud"}, {"--no-such-flag"}} {
		if code := run(args); code != 2 {
			t.Errorf("run(%q) = %d, want 2", args, code)
		}
	}
}
