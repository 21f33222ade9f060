package app

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// Healthcheck probes a running server's management API and returns the
// exit status: 0 when it answers 200, 1 otherwise. It is for container
// health checks in an image without a shell or curl:
//
//	reverst healthcheck [URL]
//
// Without URL it asks /readyz on REVERST_MANAGEMENT_ADDRESS, with an
// unspecified host (0.0.0.0, ::) replaced by loopback.
func Healthcheck(ctx context.Context, args []string, stderr io.Writer) int {
	var url string
	switch len(args) {
	case 0:
		addr := os.Getenv(EnvPrefix + "MANAGEMENT_ADDRESS")
		if addr == "" {
			fmt.Fprintf(stderr, "reverst healthcheck: no URL given and %sMANAGEMENT_ADDRESS is not set\n", EnvPrefix)
			return 2
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			fmt.Fprintf(stderr, "reverst healthcheck: %sMANAGEMENT_ADDRESS: %v\n", EnvPrefix, err)
			return 2
		}
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			host = "127.0.0.1"
		}
		url = "http://" + net.JoinHostPort(host, port) + "/readyz"
	case 1:
		url = args[0]
	default:
		fmt.Fprintln(stderr, "usage: reverst healthcheck [URL]")
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		fmt.Fprintf(stderr, "reverst healthcheck: %v\n", err)
		return 2
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "reverst healthcheck: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "reverst healthcheck: %s: %s %s\n", url, resp.Status, body)
		return 1
	}
	return 0
}
