package sources

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/reverst-dev/reverst/groups"
)

// requestTimeout bounds one poll of a URL source whose HTTP client sets no
// timeout, and the GET of a ConfigMap source's Load.
const requestTimeout = 30 * time.Second

// remote is a definition served over HTTP(S). It polls with conditional
// requests, so an unchanged definition costs a 304 and no parsing.
type remote struct {
	url  string
	opts Options
	r    *reloader

	mu           sync.Mutex // validators, shared by Load and Watch
	etag         string
	lastModified string
}

func newURL(u *url.URL, opts Options, m *metrics) *remote {
	return &remote{url: u.String(), opts: opts, r: newReloader("url "+redact(u), opts.Logger, m)}
}

// redact drops credentials and the query (which may carry them) from u.
func redact(u *url.URL) string {
	c := *u
	c.User = nil
	if c.RawQuery != "" {
		c.RawQuery = "REDACTED"
	}
	c.Fragment = ""
	return c.String()
}

// redactErr replaces an error that may quote a URL with credentials.
func redactErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %w", ue.Op, ue.Err)
	}
	return err
}

func (s *remote) String() string { return s.r.name }

func (s *remote) Status() error { return s.r.Status() }

// Load fetches and validates the definition.
func (s *remote) Load(ctx context.Context) (*groups.Config, error) {
	data, _, err := s.fetch(ctx, false)
	if err != nil {
		s.r.fail(err)
		return nil, err
	}
	return s.r.load(data)
}

// Watch polls every PollInterval; after a failure (unreachable, an answer
// other than 200 or 304, an invalid body, a refused apply) it waits longer
// and longer, up to MaxBackoff, until a poll succeeds.
func (s *remote) Watch(ctx context.Context, apply func(*groups.Config) error) error {
	retry := retryBackoff(s.opts.PollInterval, s.opts.MaxBackoff)
	for {
		wait := s.opts.PollInterval
		if err := s.poll(ctx, apply); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			wait = retry.NextBackOff()
		} else {
			retry.Reset()
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

func (s *remote) poll(ctx context.Context, apply func(*groups.Config) error) error {
	data, changed, err := s.fetch(ctx, true)
	if err != nil {
		if ctx.Err() == nil {
			s.r.fail(err)
		}
		return err
	}
	if !changed {
		s.r.unchanged()
		return nil
	}
	if err := s.r.offer(data, apply); err != nil {
		// Ask for the body again next time: a 304 would stand for a
		// definition that was not applied, which is to be tried again.
		s.mu.Lock()
		s.etag, s.lastModified = "", ""
		s.mu.Unlock()
		return err
	}
	return nil
}

// fetch GETs the definition; conditional makes it send the validators of
// the last body received, and changed is false when the server answers 304.
func (s *remote) fetch(ctx context.Context, conditional bool) (data []byte, changed bool, err error) {
	if s.opts.HTTPClient.Timeout == 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, requestTimeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", s, redactErr(err))
	}
	req.Header.Set("Accept", "application/yaml, text/yaml, text/plain;q=0.9, */*;q=0.5")
	if conditional {
		s.mu.Lock()
		if s.etag != "" {
			req.Header.Set("If-None-Match", s.etag)
		}
		if s.lastModified != "" {
			req.Header.Set("If-Modified-Since", s.lastModified)
		}
		s.mu.Unlock()
		// A 304 only means "unchanged" as an answer to validators; to a
		// request without any (no body received yet, or the last one was
		// not applied) it vouches for nothing.
		conditional = req.Header.Get("If-None-Match") != "" || req.Header.Get("If-Modified-Since") != ""
	}
	resp, err := s.opts.HTTPClient.Do(req)
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", s, redactErr(err))
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotModified:
		if conditional {
			return nil, false, nil
		}
		fallthrough
	default:
		return nil, false, fmt.Errorf("%s: unexpected answer %s", s, resp.Status)
	}
	data, err = readAll(resp.Body, s.opts.MaxBytes)
	if err != nil {
		return nil, false, fmt.Errorf("%s: reading body: %w", s, redactErr(err))
	}
	s.mu.Lock()
	s.etag = resp.Header.Get("ETag")
	s.lastModified = resp.Header.Get("Last-Modified")
	s.mu.Unlock()
	return data, true, nil
}
