package flagenv

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"
	"time"
)

type settings struct {
	Name  string        `env:"NAME"`
	Wait  time.Duration `env:"WAIT" envDefault:"1s"`
	Quiet bool          `env:"QUIET"`
}

func (s *settings) set() *Set {
	return &Set{Command: "cmd", Prefix: "T_", Options: []Option{
		{Short: "n", Long: "name", Env: "NAME", Kind: "STRING", Usage: "a name", Required: true, Bind: String(&s.Name)},
		{Long: "wait", Env: "WAIT", Kind: "DURATION", Default: "1s", Usage: "a wait", Bind: Duration(&s.Wait)},
		{Short: "q", Long: "quiet", Env: "QUIET", Usage: "no output", Bind: Bool(&s.Quiet)},
	}}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		environ map[string]string
		want    settings
		rest    []string
		err     string
	}{
		{"env", nil, map[string]string{"T_NAME": "e", "T_WAIT": "2s", "T_QUIET": "true"}, settings{"e", 2 * time.Second, true}, nil, ""},
		{"flag wins", []string{"-n", "f", "--wait", "3s"}, map[string]string{"T_NAME": "e"}, settings{"f", 3 * time.Second, false}, nil, ""},
		{"positional among flags", []string{"http", "-n", "f", "8080", "-q"}, nil, settings{"f", time.Second, true}, []string{"http", "8080"}, ""},
		{"missing required", nil, nil, settings{}, nil, "missing required setting name (flag -n/--name or env T_NAME)"},
		{"bad env names the variable", nil, map[string]string{"T_NAME": "x", "T_WAIT": "soon"}, settings{}, nil, "T_WAIT"},
		{"unknown flag", []string{"--nope"}, nil, settings{}, nil, "see cmd -h"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var s settings
			environ := tt.environ
			if environ == nil {
				environ = map[string]string{}
			}
			rest, err := s.set().Parse(&s, tt.args, environ)
			if tt.err != "" {
				if !errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("got %v, want ErrUsage with %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s != tt.want || strings.Join(rest, " ") != strings.Join(tt.rest, " ") {
				t.Fatalf("got %+v %q, want %+v %q", s, rest, tt.want, tt.rest)
			}
		})
	}
}

func TestHelpAndFlags(t *testing.T) {
	var s settings
	set := s.set()
	if _, err := set.Parse(&s, []string{"-h"}, map[string]string{}); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("got %v, want flag.ErrHelp", err)
	}
	var out bytes.Buffer
	set.PrintFlags(&out)
	for _, want := range []string{"-n, --name STRING", "a name (required) [$T_NAME]", "--wait DURATION", "(default: 1s) [$T_WAIT]", "-q, --quiet  "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("usage lacks %q:\n%s", want, out.String())
		}
	}
}

func TestLevel(t *testing.T) {
	for _, in := range []string{"debug", "INFO", "warn", "warning", "error"} {
		if _, err := Level(in); err != nil {
			t.Errorf("Level(%q): %v", in, err)
		}
	}
	if _, err := Level("loud"); err == nil {
		t.Error("Level(loud) accepted")
	}
}
