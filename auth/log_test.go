package auth

import (
	"encoding/base64"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/internal/testlog"
)

// TestNoSecretsInLogs runs allow, deny and error cases of every strategy
// with debug logging and checks that no credential appears in the log or in
// the errors (which the tunnel server logs).
func TestNoSecretsInLogs(t *testing.T) {
	const (
		user        = "alice-user-name"
		password    = "hunter2-password"
		token       = "static-token-xyz"
		fileToken   = "file-token-rotated"
		hashedToken = "hashed-token-abc"
		extAllow    = "ext-allow-token"
		extDeny     = "ext-deny-token"
		extError    = "ext-error-token"
		extSlow     = "ext-slow-token"
		extDown     = "ext-down-token"
		noScheme    = "rawsecretwithoutascheme"
		endpointKey = "endpoint-query-key"
		wrongPass   = "wrong-password-guess"
	)
	secrets := []string{
		user, password, token, fileToken, hashedToken, hexDigest(hashedToken),
		extAllow, extDeny, extError, extSlow, extDown, noScheme, endpointKey, wrongPass,
		base64.StdEncoding.EncodeToString([]byte(user + ":" + password)),
		base64.StdEncoding.EncodeToString([]byte(user + ":" + wrongPass)),
	}

	var out testlog.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	jsonLog := slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))

	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(fileToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("Authorization") {
		case "Bearer " + extAllow:
			w.WriteHeader(http.StatusOK)
		case "Bearer " + extDeny:
			w.WriteHeader(http.StatusUnauthorized)
		case "Bearer " + extSlow:
			<-r.Context().Done()
		default:
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	t.Cleanup(s.Close)
	down := newAuthServer(t, http.StatusOK)
	down.Close()

	f := &Factory{Logger: log, ExternalTimeout: 100 * time.Millisecond}
	withKey := s.URL + "/auth?key=" + endpointKey
	mixed, err := f.New(groups.Authentication{
		Basic:    &groups.Basic{Username: user, Password: password},
		Bearer:   &groups.Bearer{Scheme: "Token", Token: token},
		External: &groups.External{Endpoint: withKey},
	})
	if err != nil {
		t.Fatal(err)
	}
	fromFile, err := f.New(groups.Authentication{Bearer: &groups.Bearer{TokenPath: tokenFile}})
	if err != nil {
		t.Fatal(err)
	}
	hashed, err := f.New(groups.Authentication{Bearer: &groups.Bearer{HashedToken: hexDigest(hashedToken)}})
	if err != nil {
		t.Fatal(err)
	}
	missing, err := f.New(groups.Authentication{Bearer: &groups.Bearer{TokenPath: filepath.Join(dir, "missing")}})
	if err != nil {
		t.Fatal(err)
	}
	downAuth, err := f.New(groups.Authentication{External: &groups.External{Endpoint: down.URL + "/?key=" + endpointKey}})
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		a    Authenticator
		cred string
		want outcome
	}{
		{mixed, basicCred(user, password), allow},
		{mixed, basicCred(user, wrongPass), deny},
		{mixed, "Basic " + password + "!!", deny},
		{mixed, "Token " + token, allow},
		{mixed, "Token " + wrongPass, deny},
		{mixed, "Bearer " + extAllow, allow},
		{mixed, "Bearer " + extAllow, allow}, // cached
		{mixed, "Bearer " + extDeny, deny},
		{mixed, "Bearer " + extDeny, deny}, // cached
		{mixed, "Bearer " + extError, fail},
		{mixed, "Bearer " + extSlow, fail},
		{mixed, noScheme, deny},
		{mixed, "Unknown " + token, deny},
		{fromFile, "Bearer " + fileToken, allow},
		{fromFile, "Bearer " + wrongPass, deny},
		{hashed, "Bearer " + hashedToken, allow},
		{hashed, "Bearer " + hexDigest(hashedToken), deny},
		{missing, "Bearer " + token, fail},
		{downAuth, "Bearer " + extDown, fail},
	}
	for i, c := range cases {
		err := c.a.Authenticate(t.Context(), md(c.cred))
		if got := outcomeOf(err); got != c.want {
			t.Fatalf("case %d: got %v (%v), want %v", i, got, err, c.want)
		}
		// The way the tunnel server reports a failed registration.
		if err != nil {
			log.Warn("registration failed", "error", err)
			jsonLog.Warn("registration failed", "error", err)
		}
	}

	logged := out.String()
	if testing.Verbose() {
		t.Log(logged)
	}
	if !strings.Contains(logged, "external auth decision") || !strings.Contains(logged, "registration failed") {
		t.Fatalf("expected debug and failure lines, got:\n%s", logged)
	}
	for _, secret := range secrets {
		if strings.Contains(logged, secret) {
			t.Errorf("log contains secret %q:\n%s", secret, logged)
		}
	}
}
