package docker

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// composeOverride publishes the frontend on a free port rather than 8181,
// and leaves the other ports unpublished: the example reaches the server
// over the project's network, and the test needs only the frontend.
const composeOverride = `services:
  server:
    ports: !override
      - "127.0.0.1::8181/tcp"
`

// testCompose brings compose.yaml up as the README tells a user to (with
// the override above), waits for the server's healthcheck, and gets the
// example service's answer through the tunnel.
func (s *suite) testCompose(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "docker", "compose", "version").CombinedOutput(); err != nil {
		if s.ci {
			t.Fatalf("CI is set but docker compose does not work (%v: %s): .ci/test installs it (.ci/compose-v2)", err, out)
		}
		msg := fmt.Sprintf("SKIPPING the compose test: docker compose does not work (%v); run .ci/compose-v2", err)
		fmt.Fprintln(os.Stderr, "WARNING:", msg)
		t.Skip(msg)
	}
	override := filepath.Join(t.TempDir(), "compose.override.yaml")
	if err := os.WriteFile(override, []byte(composeOverride), 0o644); err != nil {
		t.Fatal(err)
	}
	project := fmt.Sprintf("reverst-e2e-%d", os.Getpid())
	compose := func(args ...string) []string {
		return append([]string{"compose", "-p", project, "-f", filepath.Join(s.root, "compose.yaml"), "-f", override}, args...)
	}
	logs := func() string {
		out, _ := exec.Command("docker", compose("logs", "--no-color")...).CombinedOutput()
		return string(out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("docker", compose("down", "-t", "5", "--remove-orphans")...).CombinedOutput(); err != nil {
			t.Errorf("docker compose down: %v\n%s", err, out)
		}
	})

	start := time.Now()
	up := exec.CommandContext(ctx, "docker", compose("up", "-d", "--build", "--wait", "--wait-timeout", "120")...)
	up.Dir = s.root
	if out, err := up.CombinedOutput(); err != nil {
		t.Fatalf("docker compose up: %v\n%s\nlogs:\n%s", err, out, logs())
	}
	t.Logf("compose project up and healthy in %v", time.Since(start).Round(time.Millisecond))
	out, err := exec.CommandContext(ctx, "docker", compose("port", "server", "8181")...).Output()
	if err != nil {
		t.Fatalf("docker compose port server 8181: %v", err)
	}
	url := "http://" + strings.TrimSpace(string(out)) + "/fo"

	// The example registers once the server answers; until then the
	// frontend has no member for the host.
	const want = "Hello from the tunnel! You requested /fo"
	var last string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = serverName
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		last = fmt.Sprintf("%d %q (%v)", resp.StatusCode, body, err)
		if resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == want {
			return
		}
	}
	t.Fatalf("GET %s (Host %s): last %s, want 200 %q\nlogs:\n%s", url, serverName, last, want, logs())
}
