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
	"reflect"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caarlos0/env/v11"
)

// ErrUsage marks configuration errors; commands exit with status 2.
var ErrUsage = errors.New("invalid configuration")

// Option is one setting.
type Option struct {
	Short, Long string // flag names; Short may be empty
	Env         string // environment variable, without the prefix
	Kind        string // value placeholder in the usage; empty for a switch
	Default     string // shown in the usage
	Usage       string
	Required    bool // a string setting that must not be empty
	// Bind defines the flag name on fs, storing into the setting's field
	// with the field's current value as the default.
	Bind func(fs *flag.FlagSet, name string)
}

// String, Bool, Int, Float and Duration make the Bind of an Option.
func String(p *string) func(*flag.FlagSet, string) {
	return func(fs *flag.FlagSet, name string) { fs.StringVar(p, name, *p, "") }
}

func Bool(p *bool) func(*flag.FlagSet, string) {
	return func(fs *flag.FlagSet, name string) { fs.BoolVar(p, name, *p, "") }
}

func Int(p *int) func(*flag.FlagSet, string) {
	return func(fs *flag.FlagSet, name string) { fs.IntVar(p, name, *p, "") }
}

func Float(p *float64) func(*flag.FlagSet, string) {
	return func(fs *flag.FlagSet, name string) { fs.Float64Var(p, name, *p, "") }
}

func Duration(p *time.Duration) func(*flag.FlagSet, string) {
	return func(fs *flag.FlagSet, name string) { fs.DurationVar(p, name, *p, "") }
}

// Set is the settings of one command.
type Set struct {
	Command string // for messages: "see COMMAND -h"
	Prefix  string // of every environment variable, e.g. "REVERST_"
	Options []Option
}

// Parse fills dst, a pointer to a struct with env tags that the Options
// bind, from environ (nil: the process environment) and then args, and
// returns the positional arguments, which may stand among the flags.
// -h and --help return flag.ErrHelp. Every other error wraps ErrUsage and
// names the flag or variable at fault; required settings left empty are
// all reported at once.
func (s *Set) Parse(dst any, args []string, environ map[string]string) ([]string, error) {
	opts := env.Options{Prefix: s.Prefix}
	if environ != nil {
		opts.Environment = environ
	}
	if err := env.ParseWithOptions(dst, opts); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUsage, s.envError(dst, err))
	}
	fs := flag.NewFlagSet(s.Command, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, o := range s.Options {
		if o.Short != "" {
			o.Bind(fs, o.Short)
		}
		o.Bind(fs, o.Long)
	}
	var positional []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
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
	for _, o := range s.Options {
		if o.Required && fs.Lookup(o.Long).Value.String() == "" {
			name := "--" + o.Long
			if o.Short != "" {
				name = "-" + o.Short + "/" + name
			}
			missing = append(missing, fmt.Errorf("missing required setting %s (flag %s or env %s%s)", o.Long, name, s.Prefix, o.Env))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrUsage, errors.Join(missing...))
	}
	return positional, nil
}

// envError names the environment variable behind each parse error; the
// library only knows the Go field.
func (s *Set) envError(dst any, err error) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err
	}
	t := reflect.TypeOf(dst).Elem()
	var errs []error
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			if f, ok := t.FieldByName(pe.Name); ok {
				errs = append(errs, fmt.Errorf("%s%s: %w", s.Prefix, f.Tag.Get("env"), pe.Err))
				continue
			}
		}
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

// PrintFlags writes one line per option, aligned.
func (s *Set) PrintFlags(out io.Writer) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, o := range s.Options {
		name := "    --" + o.Long
		if o.Short != "" {
			name = "-" + o.Short + ", --" + o.Long
		}
		if o.Kind != "" {
			name += " " + o.Kind
		}
		usage := o.Usage
		switch {
		case o.Required:
			usage += " (required)"
		case o.Default != "":
			usage += " (default: " + o.Default + ")"
		}
		fmt.Fprintf(tw, "  %s\t%s [$%s%s]\n", name, usage, s.Prefix, o.Env)
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
