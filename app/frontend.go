package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"

	"github.com/reverst-dev/reverst/internal/rawsock"
)

// frontend is a public listener of the tunnel server, where visitors come.
type frontend struct {
	name string
	srv  *http.Server
	ln   net.Listener
	tls  bool // served with srv.TLSConfig
}

func (f frontend) serve(logger *slog.Logger) error {
	logger.Info("serving "+f.name, "address", f.ln.Addr().String())
	// A visitor's request and its answer cross the listener's connections:
	// raw system calls spare each a wake of the runtime's monitor.
	ln := rawsock.Listener{Listener: f.ln}
	var err error
	if f.tls {
		err = f.srv.ServeTLS(ln, "", "")
	} else {
		err = f.srv.Serve(ln)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("%s: %w", f.name, err)
}

// serveFrontends serves every frontend until they are shut down (nil) or
// one of them fails (its error, at once).
func serveFrontends(fs []frontend, logger *slog.Logger) error {
	errs := make(chan error, len(fs))
	for _, f := range fs {
		go func() { errs <- f.serve(logger) }()
	}
	for range fs {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

// shutdownFrontends stops every frontend from taking visitors at once and
// lets the requests in flight finish until ctx is done; those left then
// are cut.
func shutdownFrontends(ctx context.Context, fs []frontend, logger *slog.Logger) {
	var wg sync.WaitGroup
	for _, f := range fs {
		wg.Go(func() {
			if err := f.srv.Shutdown(ctx); err != nil {
				logger.Warn(f.name+" did not drain in time", "error", err)
				_ = f.srv.Close()
			}
		})
	}
	wg.Wait()
}
