package client_test

import (
	"bytes"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/reverst-dev/reverst/client"
)

// syncBuffer is a bytes.Buffer for a slog handler written from many
// goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// A visitor's query string may carry a secret (?access_token=...). The
// Server's lines name a request by its path only, and reverst-tunnel's
// debug request log leaves the query out for that reason; a Logger at
// debug level must not receive it by another way on either transport.
func TestDebugLogOmitsQuery(t *testing.T) {
	transports(t, func(t *testing.T, quicOnly bool) {
		e := startRealServer(t)
		var logs syncBuffer
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
