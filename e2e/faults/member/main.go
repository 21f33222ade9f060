// Command member is the tunnel member process of the fault-injection
// suite (package faults): a client.Server with the library's defaults that
// the tests can SIGKILL or SIGTERM. On SIGTERM it calls Shutdown, which
// drains, and exits 0 once every request in flight has finished.
//
// It prints one line on stdout per event, for the test to follow:
//
//	direct ADDR                     with -direct, the handler's own HTTP address
//	registered LOCAL_ADDR           after each successful registration
//	drained served=N after_drain=M  after Shutdown returned
//
// Every answer carries its -name in the header X-Member. Its handler serves:
//
//	/id?ms=N&on=NAME  its -name, after N milliseconds (only if its -name is
//	                  NAME, when on is given); any method, a body is read first
//	/panic[?late]     panics (with late, after a flushed part of its answer)
//	/stream?n=N&interval=D  N lines "SEQ UNIX_NANO", each flushed, D apart
//	/upload           reads the body and answers "BYTES CRC32 FIRST_NANO",
//	                  FIRST_NANO the wall clock when its first byte came
//	/ws               WebSocket: echoes every message until "close"
//	/wsactive         how many /ws handlers are running
//	/served           how many requests it has received (this one included)
//	/running?method=M how many other handlers are running (of method M only,
//	                  if given)
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"

	"github.com/reverst-dev/reverst/client"
)

func main() {
	if err := run(); err != nil {
		slog.Error("member failed", "error", err)
		os.Exit(1)
	}
}

func run() error {
	tunnelAddr := flag.String("tunnel", "", "tunnel server QUIC address")
	caPath := flag.String("ca", "", "PEM certificate of the tunnel server")
	serverName := flag.String("server-name", "", "TLS name of the tunnel server")
	group := flag.String("group", "", "tunnel group")
	user := flag.String("user", "", "basic auth user")
	pass := flag.String("pass", "", "basic auth password")
	name := flag.String("name", "member", "answered by /id")
	shutdownTimeout := flag.Duration("shutdown-timeout", 10*time.Second, "time allowed to drain on SIGTERM")
	direct := flag.Bool("direct", false, "also serve the handler on a loopback TCP port, as a control for the tests")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("member", *name)
	pem, err := os.ReadFile(*caPath)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", *caPath)
	}

	h := &handler{name: *name, log: log}
	var stdout sync.Mutex
	say := func(format string, args ...any) {
		stdout.Lock()
		defer stdout.Unlock()
		fmt.Fprintf(os.Stdout, format+"\n", args...)
	}
	if *direct {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		hs := &http.Server{Handler: h.mux(), ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = hs.Serve(ln) }()
		defer hs.Close()
		say("direct %s", ln.Addr())
	}
	srv := &client.Server{
		TunnelGroup:   *group,
		Handler:       h.mux(),
		TLSConfig:     &tls.Config{RootCAs: roots, ServerName: *serverName},
		Authenticator: client.BasicAuthenticator(*user, *pass),
		Logger:        log,
		OnConnectionReady: func(ci client.ConnectionInfo) {
			say("registered %s", ci.LocalAddr)
		},
	}

	// SIGKILL needs no handling; SIGTERM drains.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, os.Interrupt)
	served := make(chan error, 1)
	go func() { served <- srv.DialAndServe(context.Background(), *tunnelAddr) }()

	select {
	case err := <-served:
		return fmt.Errorf("DialAndServe: %w", err)
	case <-term:
	}
	h.draining.Store(true)
	log.Info("SIGTERM: draining")
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("Shutdown: %w", err)
	}
	if err := <-served; !errors.Is(err, client.ErrServerClosed) {
		return fmt.Errorf("DialAndServe after Shutdown: %w", err)
	}
	say("drained served=%d after_drain=%d", h.served.Load(), h.afterDrain.Load())
	return nil
}

type handler struct {
	name       string
	log        *slog.Logger
	draining   atomic.Bool
	received   atomic.Int64 // requests that reached the handler
	served     atomic.Int64 // requests finished
	afterDrain atomic.Int64 // requests that arrived after SIGTERM
	wsActive   atomic.Int64

	mu      sync.Mutex
	running map[string]int // handlers running, by method
}

func (h *handler) mux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/id", h.id)
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("late") {
			// Too late for a 500: the visitor must not take the answer
			// for a complete one.
			_, _ = io.WriteString(w, "partial")
			_ = http.NewResponseController(w).Flush()
		}
		panic("deliberate panic for the fault suite")
	})
	mux.HandleFunc("GET /stream", h.stream)
	mux.HandleFunc("POST /upload", h.upload)
	mux.Handle("GET /ws", websocket.Handler(h.echo))
	mux.HandleFunc("GET /wsactive", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, h.wsActive.Load())
	})
	mux.HandleFunc("GET /served", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, h.received.Load())
	})
	mux.HandleFunc("GET /running", func(w http.ResponseWriter, r *http.Request) {
		method := r.URL.Query().Get("method")
		n := h.runningNow(method)
		if method == "" || method == r.Method {
			n-- // not this one
		}
		fmt.Fprint(w, n)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.received.Add(1)
		h.track(r.Method, 1)
		w.Header().Set("X-Member", h.name)
		if h.draining.Load() {
			h.afterDrain.Add(1)
		}
		// Deferred, so that a handler that panics is counted as done.
		defer h.served.Add(1)
		defer h.track(r.Method, -1)
		mux.ServeHTTP(w, r)
	})
}

func (h *handler) track(method string, d int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.running == nil {
		h.running = map[string]int{}
	}
	h.running[method] += d
}

// runningNow counts the handlers running, of method or, if it is empty,
// of every method.
func (h *handler) runningNow(method string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if method != "" {
		return h.running[method]
	}
	n := 0
	for _, c := range h.running {
		n += c
	}
	return n
}

func (h *handler) id(w http.ResponseWriter, r *http.Request) {
	// The whole body is in before the wait: a request that dies during
	// it has been sent, and must not be sent again unless it is safe.
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		return
	}
	q := r.URL.Query()
	if on := q.Get("on"); on != "" && on != h.name {
		_, _ = io.WriteString(w, h.name)
		return
	}
	if ms, _ := strconv.Atoi(q.Get("ms")); ms > 0 {
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
	}
	_, _ = io.WriteString(w, h.name)
}

// stream writes lines stamped with the wall clock right before each flush,
// so that the visitor on the same machine can measure each line's delay.
func (h *handler) stream(w http.ResponseWriter, r *http.Request) {
	n, _ := strconv.Atoi(r.URL.Query().Get("n"))
	interval, _ := time.ParseDuration(r.URL.Query().Get("interval"))
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/plain")
	tick := time.NewTicker(max(interval, time.Millisecond))
	defer tick.Stop()
	for i := range n {
		if i > 0 {
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
		}
		if _, err := fmt.Fprintf(w, "%d %d\n", i, time.Now().UnixNano()); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
	}
}

func (h *handler) upload(w http.ResponseWriter, r *http.Request) {
	sum := crc32.NewIEEE()
	body := &firstByte{r: r.Body}
	n, err := io.CopyBuffer(sum, body, make([]byte, 256<<10))
	if err != nil {
		h.log.Warn("upload interrupted", "bytes", n, "error", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	fmt.Fprintf(w, "%d %08x %d", n, sum.Sum32(), body.at.UnixNano())
}

// firstByte notes when the first byte was read from r.
type firstByte struct {
	r  io.Reader
	at time.Time
}

func (f *firstByte) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	if n > 0 && f.at.IsZero() {
		f.at = time.Now()
	}
	return n, err
}

func (h *handler) echo(ws *websocket.Conn) {
	h.wsActive.Add(1)
	defer h.wsActive.Add(-1)
	for {
		var msg []byte
		if err := websocket.Message.Receive(ws, &msg); err != nil {
			return
		}
		if string(msg) == "close" {
			_ = ws.Close()
			return
		}
		if err := websocket.Message.Send(ws, msg); err != nil {
			return
		}
	}
}
