package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(*config) bool
		wantErr string
	}{
		{
			name: "defaults",
			args: []string{"-g", "g", "http", "8080"},
			check: func(c *config) bool {
				return c.TunnelAddress == "127.0.0.1:7171" && c.Group == "g" && c.HostHeader == hostPreserve &&
					c.ShutdownTimeout == 15*time.Second && c.target.String() == "http://localhost:8080" && c.authenticator() == nil &&
					!c.QUICOnly
			},
		},
		{
			name: "environment",
			args: []string{"http", "example.internal:3000"},
			env: map[string]string{
				"REVERST_TUNNEL_ADDRESS": "tunnel.example:7000", "REVERST_TUNNEL_GROUP": "eg", "REVERST_SERVER_NAME": "sni.example",
				"REVERST_INSECURE_SKIP_VERIFY": "true", "REVERST_TOKEN": "tok", "REVERST_HOST_HEADER": "rewrite",
				"REVERST_SHUTDOWN_TIMEOUT": "2s", "REVERST_LOG": "debug", "REVERST_QUIC_ONLY": "true",
			},
			check: func(c *config) bool {
				return c.TunnelAddress == "tunnel.example:7000" && c.Group == "eg" && c.ServerName == "sni.example" && c.Insecure &&
					c.Token == "tok" && c.HostHeader == hostRewrite && c.ShutdownTimeout == 2*time.Second && c.Log == "debug" &&
					c.QUICOnly && c.target.String() == "http://example.internal:3000" && c.authenticator() != nil
			},
		},
		{
			name: "flag wins over env, flags after the arguments",
			args: []string{"http", "https://127.0.0.1:8443/base", "--group", "flag", "-a", "10.0.0.1:7171", "-u", "user"},
			env:  map[string]string{"REVERST_TUNNEL_GROUP": "env", "REVERST_TUNNEL_ADDRESS": "env:1", "REVERST_PASSWORD": "secret"},
			check: func(c *config) bool {
				return c.Group == "flag" && c.TunnelAddress == "10.0.0.1:7171" && c.Username == "user" && c.Password == "secret" &&
					c.target.String() == "https://127.0.0.1:8443/base"
			},
		},
		{name: "no arguments", args: []string{"-g", "g"}, wantErr: "want the arguments"},
		{name: "unknown protocol", args: []string{"-g", "g", "tcp", "22"}, wantErr: "want the arguments"},
		{name: "extra argument", args: []string{"-g", "g", "http", "80", "81"}, wantErr: "want the arguments"},
		{name: "no group", args: []string{"http", "80"}, wantErr: "REVERST_TUNNEL_GROUP"},
		{name: "bad port", args: []string{"-g", "g", "http", "eighty"}, wantErr: "invalid port"},
		{name: "bad scheme", args: []string{"-g", "g", "http", "ftp://x:21"}, wantErr: "scheme must be http or https"},
		{name: "no host", args: []string{"-g", "g", "http", "http://:80"}, wantErr: "no host"},
		{name: "address without port", args: []string{"-g", "g", "-a", "tunnel.example", "http", "80"}, wantErr: "--tunnel-address"},
		{name: "address without host", args: []string{"-g", "g", "-a", ":7171", "http", "80"}, wantErr: "--tunnel-address (REVERST_TUNNEL_ADDRESS) \":7171\": missing host"},
		{name: "address port out of range", args: []string{"-g", "g", "http", "80"}, env: map[string]string{"REVERST_TUNNEL_ADDRESS": "127.0.0.1:99999"}, wantErr: "--tunnel-address (REVERST_TUNNEL_ADDRESS)"},
		{name: "target port out of range", args: []string{"-g", "g", "http", "99999"}, wantErr: `target "http://localhost:99999": address 99999: invalid port`},
		{name: "ca and insecure", args: []string{"-g", "g", "--ca", "x.pem", "--insecure", "http", "80"}, wantErr: "exclude each other"},
		{name: "user without password", args: []string{"-g", "g", "-u", "user", "http", "80"}, wantErr: "both --username (REVERST_USERNAME) and --password (REVERST_PASSWORD)"},
		{name: "basic and token", args: []string{"-g", "g", "-u", "u", "-p", "p", "-t", "t", "http", "80"}, wantErr: "not both"},
		{name: "bad log level", args: []string{"-g", "g", "--log", "loud", "http", "80"}, wantErr: "REVERST_LOG"},
		{name: "bad env value", args: []string{"-g", "g", "http", "80"}, env: map[string]string{"REVERST_SHUTDOWN_TIMEOUT": "soon"}, wantErr: "REVERST_SHUTDOWN_TIMEOUT"},
		{name: "unknown flag", args: []string{"--nope", "-g", "g", "http", "80"}, wantErr: "nope"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := tt.env
			if env == nil {
				env = map[string]string{}
			}
			c, err := parseConfig(tt.args, env, &bytes.Buffer{})
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseConfig = %v, want a usage error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			if !tt.check(c) {
				t.Errorf("config = %+v (target %v)", c, c.target)
			}
		})
	}
}

func TestUsageListsEveryFlagAndEnv(t *testing.T) {
	var out bytes.Buffer
	if _, err := parseConfig([]string{"-h"}, map[string]string{}, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("parseConfig(-h) = %v, want flag.ErrHelp", err)
	}
	usage := out.String()
	for _, o := range options() {
		if !strings.Contains(usage, "--"+o.Long) {
			t.Errorf("usage lacks --%s", o.Long)
		}
		if o.Short != "" && !strings.Contains(usage, "-"+o.Short+", --"+o.Long) {
			t.Errorf("usage lacks -%s", o.Short)
		}
	}
	for _, want := range []string{"REVERST_TUNNEL_ADDRESS", "REVERST_TUNNEL_GROUP", "REVERST_SERVER_NAME", "REVERST_CA_FILE",
		"REVERST_INSECURE_SKIP_VERIFY", "REVERST_USERNAME", "REVERST_PASSWORD", "REVERST_TOKEN", "http TARGET"} {
		if !strings.Contains(usage, want) {
			t.Errorf("usage lacks %q", want)
		}
	}
}

// A CA file that does not load is named by its flag and its variable, as
// it is often set in the environment only.
func TestCAFileErrorsNameFlagAndEnv(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.txt")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{filepath.Join(dir, "missing.pem"), notPEM} {
		c, err := parseConfig([]string{"http", "8080"}, map[string]string{"REVERST_TUNNEL_GROUP": "g", "REVERST_CA_FILE": path}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.tlsConfig(); err == nil || !strings.Contains(err.Error(), "--ca (REVERST_CA_FILE)") {
			t.Errorf("CA file %s: got %v, want an error naming --ca (REVERST_CA_FILE)", path, err)
		}
	}
}
