package app

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/internal/testnet"
)

var required = []string{"-n", "flipt.dev.local", "-k", "key.pem", "-c", "cert.pem"}

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig(required, map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Log: "info", TunnelAddress: "127.0.0.1:7171", HTTPAddress: "0.0.0.0:8181",
		ServerName: "flipt.dev.local", PrivateKeyPath: "key.pem", CertificatePath: "cert.pem",
		TunnelGroups: "groups.yml", MaxIdleTimeout: time.Minute, KeepAlivePeriod: 30 * time.Second,
		ShutdownTimeout: 8 * time.Second, ExternalAuthTimeout: 3 * time.Second, ExternalAuthCache: 4096,
		ExternalAuthAllowTTL: time.Minute, ExternalAuthDenyTTL: 10 * time.Second, MaxHeaderBytes: 65536, GroupsPoll: 10 * time.Second,
		QueueTimeout: time.Second, RegistrationRate: 50, RegistrationBurst: 200,
	}
	if *c != want {
		t.Fatalf("got %+v\nwant %+v", *c, want)
	}
}

func TestFlagsAndEnv(t *testing.T) {
	environ := map[string]string{
		"REVERST_SERVER_NAME":        "env.example",
		"REVERST_PRIVATE_KEY_PATH":   "env.key",
		"REVERST_CERTIFICATE_PATH":   "env.crt",
		"REVERST_TUNNEL_ADDRESS":     "0.0.0.0:9999",
		"REVERST_WATCH_GROUPS":       "true",
		"REVERST_MAX_IDLE_TIMEOUT":   "2m",
		"REVERST_LOG":                "debug",
		"REVERST_MANAGEMENT_ADDRESS": "127.0.0.1:9000",
	}
	tests := []struct {
		name  string
		args  []string
		check func(*Config) bool
	}{
		{"env only", nil, func(c *Config) bool {
			return c.ServerName == "env.example" && c.TunnelAddress == "0.0.0.0:9999" && c.WatchGroups &&
				c.MaxIdleTimeout == 2*time.Minute && c.Log == "debug" && c.ManagementAddress == "127.0.0.1:9000"
		}},
		{"short flag wins", []string{"-a", "127.0.0.1:1"}, func(c *Config) bool { return c.TunnelAddress == "127.0.0.1:1" }},
		{"long flag wins", []string{"--tunnel-address", "127.0.0.1:2"}, func(c *Config) bool { return c.TunnelAddress == "127.0.0.1:2" }},
		{"bool flag false wins", []string{"-w=false"}, func(c *Config) bool { return !c.WatchGroups }},
		{"duration flag", []string{"--keep-alive-period", "5s"}, func(c *Config) bool { return c.KeepAlivePeriod == 5*time.Second }},
		{"log short", []string{"-l", "warn"}, func(c *Config) bool { return c.Log == "warn" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig(tt.args, environ, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Fatalf("unexpected config %+v", c)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		environ map[string]string
		want    []string
	}{
		{"missing required", nil, nil, []string{"--server-name", "REVERST_SERVER_NAME", "--private-key-path", "REVERST_PRIVATE_KEY_PATH", "--certificate-path", "REVERST_CERTIFICATE_PATH"}},
		{"bad log level", append([]string{"-l", "loud"}, required...), nil, []string{"--log", "loud"}},
		{"bad env duration", required, map[string]string{"REVERST_MAX_IDLE_TIMEOUT": "soon"}, []string{`--max-idle-timeout (REVERST_MAX_IDLE_TIMEOUT): invalid value "soon"`}},
		{"bad flag duration", append([]string{"--queue-timeout", "soon"}, required...), nil, []string{`--queue-timeout (REVERST_QUEUE_TIMEOUT): invalid value "soon"`}},
		{"duration not positive", required, map[string]string{"REVERST_SHUTDOWN_TIMEOUT": "0s"}, []string{"--shutdown-timeout (REVERST_SHUTDOWN_TIMEOUT): must be positive"}},
		{"negative burst", required, map[string]string{"REVERST_REGISTRATION_BURST": "-1"}, []string{"--registration-burst (REVERST_REGISTRATION_BURST): must not be negative, got -1"}},
		{"keep-alive not shorter than idle", append([]string{"--keep-alive-period", "2m"}, required...), nil, []string{"--keep-alive-period"}},
		{"tunnel port out of range", required, map[string]string{"REVERST_TUNNEL_ADDRESS": "127.0.0.1:99999"}, []string{`--tunnel-address (REVERST_TUNNEL_ADDRESS): invalid address "127.0.0.1:99999"`}},
		{"http address without port", append([]string{"-s", "localhost"}, required...), nil, []string{`--http-address (REVERST_HTTP_ADDRESS): invalid address "localhost"`, "HOST:PORT"}},
		{"management address without port", required, map[string]string{"REVERST_MANAGEMENT_ADDRESS": "8080"}, []string{"--management-address (REVERST_MANAGEMENT_ADDRESS)"}},
		{"registration rate not a number", required, map[string]string{"REVERST_REGISTRATION_RATE": "NaN"}, []string{"--registration-rate (REVERST_REGISTRATION_RATE)", "NaN"}},
		// An unset variable in REVERST_HTTP_ADDRESS=0.0.0.0:$PORT: not a
		// frontend on a port nobody knows.
		{"http address with an empty port", append([]string{"-s", "0.0.0.0:"}, required...), nil, []string{`--http-address (REVERST_HTTP_ADDRESS): invalid address "0.0.0.0:"`, "missing port"}},
		// The tunnel address takes TCP too, for data connections: the
		// frontend would fail to bind once started, with a message that
		// does not say why.
		{"http address on the tunnel's TCP port", append([]string{"-a", "127.0.0.1:7171", "-s", "0.0.0.0:7171"}, required...), nil,
			[]string{`--tunnel-address (REVERST_TUNNEL_ADDRESS) "127.0.0.1:7171" and --http-address (REVERST_HTTP_ADDRESS) "0.0.0.0:7171"`, "data connections"}},
		{"management address on the http frontend's port", required, map[string]string{"REVERST_MANAGEMENT_ADDRESS": ":8181"},
			[]string{`--http-address (REVERST_HTTP_ADDRESS) "0.0.0.0:8181" and --management-address (REVERST_MANAGEMENT_ADDRESS) ":8181"`}},
		{"https address same as http", append([]string{"-s", "127.0.0.1:8443", "--https-address", "127.0.0.1:8443"}, required...), nil,
			[]string{"--http-address (REVERST_HTTP_ADDRESS)", "--https-address (REVERST_HTTPS_ADDRESS)", "same TCP port"}},
		{"https certificate without https address", append([]string{"--https-certificate-path", "c.pem", "--https-private-key-path", "k.pem"}, required...), nil,
			[]string{"--https-address (REVERST_HTTPS_ADDRESS) is not", "no HTTPS frontend"}},
		{"unknown flag", []string{"--nope"}, nil, []string{"nope"}},
		{"stray argument", append([]string{"serve"}, required...), nil, []string{"serve"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			environ := tt.environ
			if environ == nil {
				environ = map[string]string{}
			}
			_, err := ParseConfig(tt.args, environ, nil)
			if !errors.Is(err, ErrUsage) {
				t.Fatalf("got %v, want ErrUsage", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if tt.name == "negative burst" && strings.Contains(err.Error(), "max-requests-per-member") {
				t.Errorf("error %q blames a setting that is fine", err)
			}
		})
	}
}

// Listeners on one port number are fine on distinct addresses, and port 0
// (a free one each) never clashes.
func TestParseConfigAcceptsDistinctListeners(t *testing.T) {
	for _, args := range [][]string{
		{"-a", "127.0.0.1:7171", "-s", "127.0.0.2:7171", "--management-address", "[::1]:7171"},
		{"-a", "127.0.0.1:0", "-s", "127.0.0.1:0", "--https-address", ":0", "--management-address", "127.0.0.1:0"},
		{"-a", "localhost:7171", "-s", "127.0.0.1:8181"},
	} {
		if _, err := ParseConfig(append(args, required...), map[string]string{}, nil); err != nil {
			t.Errorf("%q: %v", args, err)
		}
	}
}

func TestHelpListsEveryFlagAndEnv(t *testing.T) {
	var out bytes.Buffer
	_, err := ParseConfig([]string{"-h"}, map[string]string{}, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("got %v, want flag.ErrHelp", err)
	}
	usage := out.String()
	for _, o := range configOptions() {
		if !strings.Contains(usage, "--"+o.Long) {
			t.Errorf("usage lacks --%s", o.Long)
		}
		if o.Short != "" && !strings.Contains(usage, "-"+o.Short+", --"+o.Long) {
			t.Errorf("usage lacks -%s", o.Short)
		}
	}
	for _, f := range reflect.VisibleFields(reflect.TypeFor[Config]()) {
		if !strings.Contains(usage, "$REVERST_"+f.Tag.Get("env")+"]") {
			t.Errorf("usage lacks the variable of %s", f.Name)
		}
		if d := f.Tag.Get("envDefault"); d != "" && !strings.Contains(usage, "(default: "+d+")") {
			t.Errorf("usage lacks the default of %s, %s", f.Name, d)
		}
	}
}

// Settings that only prove wrong once used still name the flag and the
// variable, and a groups source of an unknown scheme is a usage error
// (status 2) like any other invalid setting.
func TestMainNamesTheSettingAtFault(t *testing.T) {
	dir := t.TempDir()
	base := []string{
		"-n", "flipt.dev.local", "-k", "../examples/simple/server.key",
		"-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP),
	}
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"groups source of unknown scheme", []string{"-c", "../examples/simple/server.crt", "-g", "ftp://example/groups.yml"}, 2,
			[]string{"--tunnel-groups (REVERST_TUNNEL_GROUPS)", `unsupported scheme \"ftp\"`}},
		{"groups file missing", []string{"-c", "../examples/simple/server.crt", "-g", filepath.Join(dir, "groups.yml")}, 1,
			[]string{"--tunnel-groups (REVERST_TUNNEL_GROUPS)", "no such file"}},
		{"certificate missing", []string{"-c", filepath.Join(dir, "server.crt"), "-g", "../examples/simple/group.yml"}, 1,
			[]string{"--certificate-path (REVERST_CERTIFICATE_PATH)", "--private-key-path (REVERST_PRIVATE_KEY_PATH)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if code := Main(context.Background(), append(tt.args, base...), &out); code != tt.code {
				t.Errorf("exit status %d, want %d; output:\n%s", code, tt.code, out.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output does not mention %q:\n%s", w, out.String())
				}
			}
		})
	}
}
