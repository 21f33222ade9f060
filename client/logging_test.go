package client_test

import (
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/reverst-dev/reverst/client"
	"github.com/reverst-dev/reverst/internal/testlog"
)

// A visitor's query string may carry a secret (?access_token=...). The
// Server's lines name a request by its path only, and reverst-tunnel's
// debug request log leaves the query out for that reason; a Logger at
// debug level must not receive it by another way on either transport.
func TestDebugLogOmitsQuery(t *testing.T) {
	transports(t, func(t *testing.T, quicOnly bool) {
		e := startRealServer(t)
		var logs testlog.Buffer
		srv := &client.Server{
			QUICOnly: quicOnly,
			Logger:   slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Handler:  http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}),
		}
		e.join(t, srv)
		resp, err := http.DefaultClient.Do(e.request(t, t.Context(), http.MethodGet, "/login?access_token=s3cret"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		for line := range strings.Lines(logs.String()) {
			if strings.Contains(line, "s3cret") {
				t.Errorf("the log has the visitor's query string: %s", line)
			}
		}
	})
}
