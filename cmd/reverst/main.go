// Command reverst is the reverst tunnel server. Run it with -h for its flags;
// every flag also reads an environment variable REVERST_<FLAG_NAME>.
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
	code := app.Main(ctx, os.Args[1:], os.Stderr)
	stop()
	os.Exit(code)
}
