package auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/reverst-dev/reverst/groups"
)

// basic checks base64("user:pass"). Only digests are kept, and digests are
// compared, so neither the secrets nor their lengths show in timing.
type basic struct {
	user, pass [sha256.Size]byte
}

func newBasic(b *groups.Basic) (*basic, error) {
	if b.Username == "" || b.Password == "" {
		return nil, errors.New("auth: basic: username and password must not be empty")
	}
	return &basic{user: sha256.Sum256([]byte(b.Username)), pass: sha256.Sum256([]byte(b.Password))}, nil
}

func (b *basic) check(_ context.Context, _, _, payload string) error {
	raw, err := base64.StdEncoding.DecodeString(payload)
	if err != nil {
		return fmt.Errorf("%w (malformed basic credentials)", errBadCredential)
	}
	user, pass, ok := bytes.Cut(raw, []byte{':'})
	if !ok {
		return fmt.Errorf("%w (malformed basic credentials)", errBadCredential)
	}
	u, p := sha256.Sum256(user), sha256.Sum256(pass)
	// Both comparisons always run: & not &&.
	if subtle.ConstantTimeCompare(u[:], b.user[:])&subtle.ConstantTimeCompare(p[:], b.pass[:]) != 1 {
		return errBadCredential
	}
	return nil
}

// bearer checks a static token against a SHA-256 digest: one fixed at
// build time, or one read through the Factory's ReadSecret on every check.
type bearer struct {
	digest func(ctx context.Context) ([sha256.Size]byte, error)
}

func newBearer(f *Factory, b *groups.Bearer) (*bearer, error) {
	switch {
	case b.Token != "":
		d := sha256.Sum256([]byte(b.Token))
		return &bearer{digest: func(context.Context) ([sha256.Size]byte, error) { return d, nil }}, nil
	case b.HashedToken != "":
		d, err := parseDigest([]byte(b.HashedToken))
		if err != nil {
			return nil, fmt.Errorf("auth: bearer.hashedToken: %w", err)
		}
		return &bearer{digest: func(context.Context) ([sha256.Size]byte, error) { return d, nil }}, nil
	case b.TokenPath != "":
		path := b.TokenPath
		return &bearer{digest: func(ctx context.Context) ([sha256.Size]byte, error) {
			tok, err := readTrimmed(ctx, f, path)
			if err != nil {
				return [sha256.Size]byte{}, fmt.Errorf("auth: bearer.tokenPath %q: %w", path, err)
			}
			return sha256.Sum256(tok), nil
		}}, nil
	case b.HashedTokenPath != "":
		path := b.HashedTokenPath
		return &bearer{digest: func(ctx context.Context) ([sha256.Size]byte, error) {
			raw, err := readTrimmed(ctx, f, path)
			if err == nil {
				var d [sha256.Size]byte
				if d, err = parseDigest(raw); err == nil {
					return d, nil
				}
			}
			return [sha256.Size]byte{}, fmt.Errorf("auth: bearer.hashedTokenPath %q: %w", path, err)
		}}, nil
	default:
		return nil, errors.New("auth: bearer: one of token, tokenPath, hashedToken or hashedTokenPath is required")
	}
}

func (b *bearer) check(ctx context.Context, _, _, payload string) error {
	want, err := b.digest(ctx)
	if err != nil {
		return err // cannot decide: a server error, never a deny or allow
	}
	got := sha256.Sum256([]byte(payload))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		return errBadCredential
	}
	return nil
}

// readTrimmed reads a secret without the trailing newline editors and
// `kubectl create secret --from-file` leave behind. An empty secret is an
// error: it must never match an empty token.
func readTrimmed(ctx context.Context, f *Factory, path string) ([]byte, error) {
	raw, err := f.readSecret(ctx, path)
	if err != nil {
		return nil, err
	}
	raw = bytes.TrimRight(raw, " \t\r\n")
	if len(raw) == 0 {
		return nil, errors.New("secret is empty")
	}
	return raw, nil
}

// parseDigest decodes a hex SHA-256 digest. The error never quotes the
// input, which may be a token put where its digest belongs.
func parseDigest(s []byte) ([sha256.Size]byte, error) {
	var d [sha256.Size]byte
	s = bytes.TrimSpace(s)
	if hex.DecodedLen(len(s)) != sha256.Size {
		return d, errors.New("not a hex SHA-256 digest (64 hex digits)")
	}
	if _, err := hex.Decode(d[:], s); err != nil {
		return d, errors.New("not a hex SHA-256 digest (64 hex digits)")
	}
	return d, nil
}
