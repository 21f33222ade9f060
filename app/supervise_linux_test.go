package app

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/reverst-dev/reverst/internal/testnet"
)

// shutdownListener makes the process's listening TCP socket on port fail its
// accept (shutdown(2) on a listening socket wakes accept with EINVAL), as a
// listener that dies at run time would.
func shutdownListener(t *testing.T, port int) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("needs /proc:", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if typ, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TYPE); err != nil || typ != syscall.SOCK_STREAM {
			continue
		}
		if acc, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err != nil || acc != 1 {
			continue
		}
		sa, err := syscall.Getsockname(fd)
		if err != nil {
			continue
		}
		if in4, ok := sa.(*syscall.SockaddrInet4); ok && in4.Port == port {
			if err := syscall.Shutdown(fd, syscall.SHUT_RDWR); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no listening socket on port %d", port)
}

// When a task fails at run time (here the HTTP frontend's listener), Run
// stops everything and returns its error, so that the process exits 1 and
// its supervisor restarts it, rather than idling without listeners until a
// SIGTERM.
func TestRunReturnsWhenATaskFails(t *testing.T) {
	dir := t.TempDir()
	groupsFile := filepath.Join(dir, "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example]}}`)
	cfg, err := ParseConfig([]string{
		"-n", "flipt.dev.local", "-k", "../examples/simple/server.key", "-c", "../examples/simple/server.crt",
		"-g", groupsFile, "-a", testnet.Addr(t, testnet.Tunnel), "-s", testnet.Addr(t, testnet.TCP),
	}, map[string]string{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background()) // never a SIGTERM
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if resp, err := http.Get("http://" + cfg.HTTPAddress + "/"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("frontend not up")
		}
	}
	_, p, _ := net.SplitHostPort(cfg.HTTPAddress)
	port, _ := strconv.Atoi(p)
	shutdownListener(t, port)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Run returned nil after the frontend failed")
		}
		t.Logf("Run: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return 5s after the HTTP frontend failed: the process hangs with its listeners stopped")
	}
}
