// Command reverst is the reverst tunnel server. Run it with -h for its flags;
// every flag also reads an environment variable REVERST_<FLAG_NAME>.
// "reverst healthcheck [URL]" probes a running server's /readyz, for
// container images without a shell.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/reverst-dev/reverst/app"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	var code int
	if len(os.Args) > 1 && os.Args[1] == "healthcheck" {
		code = app.Healthcheck(ctx, os.Args[2:], os.Stderr)
	} else {
		code = app.Main(ctx, os.Args[1:], os.Stderr)
	}
	stop()
	os.Exit(code)
}
