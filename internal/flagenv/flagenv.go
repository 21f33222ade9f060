// Package flagenv reads a command's settings the twelve-factor way: each
// setting has a short and a long flag and an environment variable, parsed
// with caarlos0/env from the struct's env tags; a flag given on the
// command line wins over the environment. It also prints the settings in
// the usage shape reverst's commands share:
//
//	-a, --tunnel-address STRING   what it is (default: x) [$REVERST_TUNNEL_ADDRESS]
package flagenv

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caarlos0/env/v11"
)

// ErrUsage marks configuration errors; commands exit with status 2.
var ErrUsage = errors.New("invalid configuration")

// Option is one setting: a field of the settings struct and its flags.
// The field's env tag names the environment variable and its envDefault
// is the default, so that neither is written twice.
type Option struct {
	Short, Long string // flag names; Short may be empty
	Field       string // the struct field set
	// Kind is the value placeholder in the usage; empty, it follows the
	// field's type (STRING, INT, FLOAT, DURATION, nothing for a switch).
	Kind string
	// Default is shown in the usage instead of the envDefault, for a
	// default that is not a value ("system roots").
	Default  string
	Usage    string
	Required bool // a string setting that must not be empty
}

// Set is the settings of one command.
type Set struct {
	Command  string // for messages: "see COMMAND -h"
	Prefix   string // of every environment variable, e.g. "REVERST_"
	Settings any    // pointer to the struct of env-tagged fields the Options set
	Options  []Option
}

// setting is an Option bound to its field.
type setting struct {
	Option
	env, def string
	ptr      any // to the field
}

// settings binds the Options to the fields of s.Settings. A mistake there
// is the program's, not the user's, and panics, as the flag package does
// on a flag defined twice: every field with an env tag must have exactly
// one option, of a type it can parse.
func (s *Set) settings() []setting {
	v := reflect.ValueOf(s.Settings)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		panic(fmt.Sprintf("flagenv: Settings of %s is %T, want a pointer to a struct", s.Command, s.Settings))
	}
	v = v.Elem()
	t := v.Type()
	bound := map[string]bool{}
	out := make([]setting, 0, len(s.Options))
	for _, o := range s.Options {
		f, ok := t.FieldByName(o.Field)
		if !ok || f.Tag.Get("env") == "" || bound[o.Field] {
			panic(fmt.Sprintf("flagenv: --%s: %s has no field %q with an env tag, or another option sets it", o.Long, t, o.Field))
		}
		bound[o.Field] = true
		st := setting{Option: o, env: f.Tag.Get("env"), def: f.Tag.Get("envDefault"), ptr: v.FieldByIndex(f.Index).Addr().Interface()}
		if o.Default != "" {
			st.def = o.Default
		}
		if st.Kind == "" {
			st.Kind = kind(st.ptr, o.Long)
		}
		out = append(out, st)
	}
	for _, f := range reflect.VisibleFields(t) {
		if f.Tag.Get("env") != "" && !bound[f.Name] {
			panic(fmt.Sprintf("flagenv: %s.%s has an env tag but no option", t, f.Name))
		}
	}
	return out
}

// kind returns the usage placeholder of a field's type.
func kind(ptr any, long string) string {
	switch ptr.(type) {
	case *string:
		return "STRING"
	case *bool:
		return ""
	case *int:
		return "INT"
	case *float64:
		return "FLOAT"
	case *time.Duration:
		return "DURATION"
	}
	panic(fmt.Sprintf("flagenv: --%s: unsupported field type %T", long, ptr))
}

// bind defines the flag name on fs, storing into the field, with the
// value the environment left in it as the default.
func (st setting) bind(fs *flag.FlagSet, name string) {
	switch p := st.ptr.(type) {
	case *string:
		fs.StringVar(p, name, *p, "")
	case *bool:
		fs.BoolVar(p, name, *p, "")
	case *int:
		fs.IntVar(p, name, *p, "")
	case *float64:
		fs.Float64Var(p, name, *p, "")
	case *time.Duration:
		fs.DurationVar(p, name, *p, "")
	}
}

// Parse fills s.Settings from environ (nil: the process environment) and
// then args, and returns the positional arguments, which may stand among
// the flags. -h and --help return flag.ErrHelp. Every other error wraps
// ErrUsage and names the flag or variable at fault; required settings left
// empty are all reported at once.
func (s *Set) Parse(args []string, environ map[string]string) ([]string, error) {
	settings := s.settings()
	opts := env.Options{Prefix: s.Prefix}
	if environ != nil {
		opts.Environment = environ
	}
	if err := env.ParseWithOptions(s.Settings, opts); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUsage, s.envError(err, environ))
	}
	fs := flag.NewFlagSet(s.Command, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var bad error // the value a flag refused, in our words
	for _, st := range settings {
		names := []string{st.Long}
		if st.Short != "" {
			names = append(names, st.Short)
		}
		for _, name := range names {
			st.bind(fs, name)
			f := fs.Lookup(name)
			f.Value = &checked{Value: f.Value, refused: func(v string) { bad = s.invalid(st, v) }}
		}
	}
	var positional []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			if bad != nil {
				err = bad
			}
			return nil, fmt.Errorf("%w: %w (see %s -h)", ErrUsage, err, s.Command)
		}
		rest = fs.Args()
		if len(rest) == 0 {
			break
		}
		positional, rest = append(positional, rest[0]), rest[1:]
	}
	var missing []error
	for _, st := range settings {
		if st.Required && fs.Lookup(st.Long).Value.String() == "" {
			name := "--" + st.Long
			if st.Short != "" {
				name = "-" + st.Short + "/" + name
			}
			missing = append(missing, fmt.Errorf("missing required setting %s (flag %s or env %s%s)", st.Long, name, s.Prefix, st.env))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrUsage, errors.Join(missing...))
	}
	return positional, nil
}

// envError restates the library's parse errors in the words of invalid;
// the library only knows the Go field.
func (s *Set) envError(err error, environ map[string]string) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err
	}
	var errs []error
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			if st, ok := s.lookup(func(st setting) bool { return st.Field == pe.Name }); ok {
				v, _ := lookupEnv(environ, s.Prefix+st.env)
				errs = append(errs, s.invalid(st, v))
				continue
			}
		}
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

func lookupEnv(environ map[string]string, name string) (string, bool) {
	if environ != nil {
		v, ok := environ[name]
		return v, ok
	}
	return os.LookupEnv(name)
}

// invalid is the error for a value of st that does not parse.
func (s *Set) invalid(st setting, value string) error {
	want := map[string]string{
		"INT":      "an integer",
		"FLOAT":    "a number",
		"DURATION": "a duration such as 30s or 1m30s",
		"":         "true or false",
	}[kind(st.ptr, st.Long)]
	return fmt.Errorf("%s: invalid value %q, want %s", s.name(st), value, want)
}

// Name returns how a message names the setting of the long flag: the flag
// and the variable, "--long-name (PREFIX_LONG_NAME)".
func (s *Set) Name(long string) string {
	st, ok := s.lookup(func(st setting) bool { return st.Long == long })
	if !ok {
		panic(fmt.Sprintf("flagenv: %s has no option --%s", s.Command, long))
	}
	return s.name(st)
}

func (s *Set) name(st setting) string {
	return fmt.Sprintf("--%s (%s%s)", st.Long, s.Prefix, st.env)
}

func (s *Set) lookup(match func(setting) bool) (setting, bool) {
	for _, st := range s.settings() {
		if match(st) {
			return st, true
		}
	}
	return setting{}, false
}

// checked is a flag's value that reports the value it refused.
type checked struct {
	flag.Value
	refused func(string)
}

func (c *checked) Set(v string) error {
	err := c.Value.Set(v)
	if err != nil {
		c.refused(v)
	}
	return err
}

// IsBoolFlag keeps a switch a switch: "-w" alone sets it.
func (c *checked) IsBoolFlag() bool {
	b, ok := c.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// PrintFlags writes one line per option, aligned.
func (s *Set) PrintFlags(out io.Writer) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, st := range s.settings() {
		name := "    --" + st.Long
		if st.Short != "" {
			name = "-" + st.Short + ", --" + st.Long
		}
		if st.Kind != "" {
			name += " " + st.Kind
		}
		usage := st.Usage
		switch {
		case st.Required:
			usage += " (required)"
		case st.def != "":
			usage += " (default: " + st.def + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s [$%s%s]\n", name, usage, s.Prefix, st.env)
	}
	_ = tw.Flush()
}

// Level parses a log level: debug, info, warn or error.
func Level(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%q is not one of debug, info, warn, error", s)
}
