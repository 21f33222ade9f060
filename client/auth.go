package client

import (
	"context"
	"encoding/base64"

	"github.com/reverst-dev/reverst/protocol"
)

// authorizationKey is the register request metadata key that carries
// credentials, spelled like the HTTP header.
const authorizationKey = "Authorization"

// An Authenticator adds credentials to a register request before it is
// sent. Authenticate is called once per connection attempt, before the
// connection is dialled, so it may return fresh credentials each time (a
// rotated token, a new JWT) and take its time getting them, up to the
// Server's RegisterTimeout (ctx's deadline): the server's registration
// timeout starts later. When the tunnel name resolves to several server
// replicas, each address has its own attempts, so Authenticate may be
// called concurrently. The request's Metadata map is non-nil when
// Authenticate is called.
//
// An error from Authenticate aborts that attempt; DialAndServe retries it
// with backoff unless the error matches [ErrUnauthorized] or
// [ErrBadRequest], which end DialAndServe.
type Authenticator interface {
	Authenticate(ctx context.Context, req *protocol.RegisterRequest) error
}

// AuthenticatorFunc adapts a function to the [Authenticator] interface.
type AuthenticatorFunc func(ctx context.Context, req *protocol.RegisterRequest) error

// Authenticate calls f(ctx, req).
func (f AuthenticatorFunc) Authenticate(ctx context.Context, req *protocol.RegisterRequest) error {
	return f(ctx, req)
}

// BasicAuthenticator presents username and password with the Basic scheme,
// as a tunnel group's `basic` strategy expects.
func BasicAuthenticator(username, password string) Authenticator {
	return SchemeAuthenticator("Basic", base64.StdEncoding.EncodeToString([]byte(username+":"+password)))
}

// BearerAuthenticator presents token with the Bearer scheme, as a tunnel
// group's `bearer` strategy expects.
func BearerAuthenticator(token string) Authenticator {
	return SchemeAuthenticator("Bearer", token)
}

// SchemeAuthenticator presents "scheme credentials" verbatim, for groups
// whose strategy overrides the scheme or uses `external` authentication
// (for example SchemeAuthenticator("JWT", token)).
func SchemeAuthenticator(scheme, credentials string) Authenticator {
	value := scheme + " " + credentials
	return AuthenticatorFunc(func(_ context.Context, req *protocol.RegisterRequest) error {
		req.Metadata[authorizationKey] = value
		return nil
	})
}
