// Package sources reads tunnel group definitions from where operators keep
// them (a file, a URL, a Kubernetes ConfigMap) and, when asked, watches them
// for changes. A source only delivers validated definitions; applying them
// is the caller's business.
package sources

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"

	"github.com/reverst-dev/reverst/groups"
)

// Source delivers group definitions.
type Source interface {
	// Load reads and validates the current definition once.
	Load(ctx context.Context) (*groups.Config, error)
	// Watch calls apply with every new valid definition until ctx is done,
	// (an error from apply counts as a failed reload and keeps the last
	// good definition),
	// then returns ctx.Err(). Invalid definitions and read failures are
	// reported and retried; they never end Watch.
	Watch(ctx context.Context, apply func(*groups.Config) error) error
	// String names the source in logs, without credentials.
	String() string
}

// Options configure the sources that Open returns.
type Options struct {
	Logger *slog.Logger
}

// Open returns the source for location: a path, a file:// URL,
// an http(s):// URL or k8s://configmap/NAMESPACE/NAME/KEY.
func Open(location string, opts Options) (Source, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	scheme, _, ok := strings.Cut(location, "://")
	if !ok {
		return &File{Path: location, Logger: opts.Logger}, nil
	}
	switch scheme {
	case "file":
		u, err := url.Parse(location)
		if err != nil {
			return nil, fmt.Errorf("tunnel groups %q: %w", location, err)
		}
		return &File{Path: u.Path, Logger: opts.Logger}, nil
	default:
		return nil, fmt.Errorf("tunnel groups %q: unsupported scheme %q", location, scheme)
	}
}

// File is a definition kept in a file.
type File struct {
	Path   string
	Logger *slog.Logger
}

func (f *File) String() string { return "file " + f.Path }

// Load reads and validates the file.
func (f *File) Load(context.Context) (*groups.Config, error) {
	data, err := os.ReadFile(f.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	cfg, err := groups.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	return cfg, nil
}

// Watch is not implemented yet: it waits for ctx.
func (f *File) Watch(ctx context.Context, apply func(*groups.Config) error) error {
	<-ctx.Done()
	return ctx.Err()
}
