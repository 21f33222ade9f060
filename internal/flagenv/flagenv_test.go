package flagenv

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
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
	return &Set{Command: "cmd", Prefix: "T_", Settings: s, Options: []Option{
		{Short: "n", Long: "name", Field: "Name", Usage: "a name", Required: true},
		{Long: "wait", Field: "Wait", Usage: "a wait"},
		{Short: "q", Long: "quiet", Field: "Quiet", Usage: "no output"},
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
		{"bad env names flag and variable", nil, map[string]string{"T_NAME": "x", "T_WAIT": "soon"}, settings{}, nil, `--wait (T_WAIT): invalid value "soon", want a duration`},
		{"bad flag names flag and variable", []string{"-n", "x", "--wait", "soon"}, nil, settings{}, nil, `--wait (T_WAIT): invalid value "soon", want a duration`},
		{"bad switch", []string{"-n", "x", "-q=maybe"}, nil, settings{}, nil, `--quiet (T_QUIET): invalid value "maybe", want true or false`},
		{"bad env switch", []string{"-n", "x"}, map[string]string{"T_QUIET": "maybe"}, settings{}, nil, `--quiet (T_QUIET): invalid value "maybe"`},
		{"unknown flag", []string{"--nope"}, nil, settings{}, nil, "see cmd -h"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var s settings
			environ := tt.environ
			if environ == nil {
				environ = map[string]string{}
			}
			rest, err := s.set().Parse(tt.args, environ)
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
	if _, err := set.Parse([]string{"-h"}, map[string]string{}); !errors.Is(err, flag.ErrHelp) {
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

// A settings struct and its options that disagree are the program's
// mistake, found the first time the command parses its settings.
func TestMismatchPanics(t *testing.T) {
	var s settings
	tests := []struct {
		name    string
		options []Option
		want    string
	}{
		{"unknown field", append(s.set().Options, Option{Long: "x", Field: "X"}), `no field "X"`},
		{"field set twice", append(s.set().Options, Option{Long: "name2", Field: "Name"}), `another option sets it`},
		{"field without option", s.set().Options[:2], "Quiet has an env tag but no option"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), tt.want) {
					t.Fatalf("recovered %v, want a panic with %q", r, tt.want)
				}
			}()
			set := &Set{Command: "cmd", Prefix: "T_", Settings: &s, Options: tt.options}
			_, _ = set.Parse(nil, map[string]string{"T_NAME": "x"})
		})
	}
}
