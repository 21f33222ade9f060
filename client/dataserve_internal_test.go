package client

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// The data connections' server answers as net/http's does: for each
// handler and request, the bytes of the response (its Date aside), and
// whether the connection stays open for the next request, are the same.
func TestDataServerAnswersAsNetHTTP(t *testing.T) {
	get := "GET /x HTTP/1.1\r\nHost: svc.example\r\n\r\n"
	head := "HEAD /x HTTP/1.1\r\nHost: svc.example\r\n\r\n"
	post := "POST /x HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 5\r\n\r\nhello"
	write := func(s string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, s) }
	}
	for _, tc := range []struct {
		name    string
		request string
		handler http.HandlerFunc
	}{
		{"declared length", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "hello")
		}},
		{"sniffed type", get, write("<html><body>hi</body></html>")},
		{"nothing written", get, func(http.ResponseWriter, *http.Request) {}},
		{"large write", get, write(strings.Repeat("a", 10000))},
		{"many small writes", get, func(w http.ResponseWriter, r *http.Request) {
			for range 100 {
				io.WriteString(w, strings.Repeat("b", 50))
			}
		}},
		{"flush", get, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "a")
			w.(http.Flusher).Flush()
			io.WriteString(w, "b")
		}},
		{"flush before writing", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			http.NewResponseController(w).Flush()
			io.WriteString(w, "data: 1\n\n")
		}},
		{"no content", get, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNoContent)
			io.WriteString(w, "x")
		}},
		{"not modified", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			w.Header().Set("Content-Length", "10")
			w.Header().Set("Etag", `"v1"`)
			w.WriteHeader(http.StatusNotModified)
		}},
		{"HEAD with a body written", head, write("hello")},
		{"HEAD with nothing written", head, func(http.ResponseWriter, *http.Request) {}},
		{"HEAD with a declared length", head, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "100")
		}},
		{"declared trailer", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", "X-Sum, Content-Length")
			io.WriteString(w, "a")
			w.Header().Set("X-Sum", "1")
		}},
		{"prefixed trailer", get, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "a")
			w.Header().Set(http.TrailerPrefix+"X-Late", "2")
		}},
		{"early hints", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Add("Link", "</a.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, "x")
		}},
		{"superfluous WriteHeader", get, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusAccepted)
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, "x")
		}},
		{"header changed after WriteHeader", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Early", "1")
			w.WriteHeader(http.StatusOK)
			w.Header().Set("X-Late", "1")
			io.WriteString(w, "x")
		}},
		{"identity transfer encoding", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Transfer-Encoding", "identity")
			io.WriteString(w, "x")
			w.(http.Flusher).Flush()
			io.WriteString(w, "y")
		}},
		{"chunked and a length", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Transfer-Encoding", "chunked")
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "hello")
		}},
		{"invalid length", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "abc")
			io.WriteString(w, "x")
		}},
		{"handler closes", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", "close")
			io.WriteString(w, "x")
		}},
		{"client closes", "GET /x HTTP/1.1\r\nHost: svc.example\r\nConnection: close\r\n\r\n", write("x")},
		{"shorter than declared", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "10")
			io.WriteString(w, "abc")
		}},
		{"longer than declared", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "2")
			io.WriteString(w, "abcdef")
		}},
		{"echo", post, func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) }},
		{"body ignored", post, write("ok")},
		{"large body ignored", "POST /x HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 300000\r\n\r\n" + strings.Repeat("z", 300000), write("ok")},
		{"body closed early", "POST /x HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 10\r\n\r\n0123456789", func(w http.ResponseWriter, r *http.Request) {
			var b [3]byte
			io.ReadFull(r.Body, b[:])
			r.Body.Close()
			w.Write(b[:])
		}},
		{"chunked request with trailer", "POST /x HTTP/1.1\r\nHost: svc.example\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n5\r\nhello\r\n0\r\nX-T: v\r\n\r\n", func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			io.WriteString(w, r.Trailer.Get("X-T")+" "+string(b))
		}},
		{"status without text", get, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(599)
			io.WriteString(w, "x")
		}},
		{"encoded, not sniffed", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Encoding", "gzip")
			io.WriteString(w, "<html>")
		}},
		{"http.Error", get, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "nope", http.StatusTeapot) }},
		{"range", "GET /f HTTP/1.1\r\nHost: svc.example\r\nRange: bytes=2-4\r\n\r\n", func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, "f.txt", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), strings.NewReader("0123456789"))
		}},
		{"value with a newline", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Bad", "a\r\nInjected: 1")
			io.WriteString(w, "x")
		}},
		{"slow, watched", get, func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(4 * watchAfter)
			io.WriteString(w, "late")
		}},
		{"slow after reading a body", post, func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			time.Sleep(4 * watchAfter)
			w.Write(b)
		}},
		{"server and local address keys", get, func(w http.ResponseWriter, r *http.Request) {
			_, srv := r.Context().Value(http.ServerContextKey).(*http.Server)
			_, local := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
			fmt.Fprint(w, srv, local)
		}},
		{"next request sent once the response is whole", get, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "hello")
			w.(http.Flusher).Flush()
			time.Sleep(4 * watchAfter)
		}},
		{"large body read after the header is flushed", "POST /x HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 300000\r\n\r\n" + strings.Repeat("z", 300000), func(w http.ResponseWriter, r *http.Request) {
			w.(http.Flusher).Flush()
			n, err := io.Copy(io.Discard, r.Body)
			fmt.Fprint(w, n, err)
		}},
		{"abort with the response unflushed", get, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, strings.Repeat("a", 3000))
			panic(http.ErrAbortHandler)
		}},
		{"hijack after a write", get, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "hello")
			c, rw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			rw.WriteString("0\r\n\r\n")
			rw.Flush()
		}},
		{"WriteHeader and Flush after a hijack", get, func(w http.ResponseWriter, r *http.Request) {
			c, rw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			w.WriteHeader(http.StatusEarlyHints)
			w.WriteHeader(http.StatusOK)
			func() {
				defer func() { recover() }() // net/http's panics
				w.(http.Flusher).Flush()
			}()
			rw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
			rw.Flush()
		}},
		{"hijack lifts a write deadline", get, func(w http.ResponseWriter, r *http.Request) {
			http.NewResponseController(w).SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
			c, rw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			time.Sleep(30 * time.Millisecond)
			rw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
			rw.Flush()
		}},
		{"abort", get, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "partial")
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// A request for /next follows on a connection left open: it
			// must find it in step.
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/next" {
					io.WriteString(w, "next")
					return
				}
				tc.handler(w, r)
			})
			want := exchanges(t, dialNetHTTP(t, h), tc.request)
			got := exchanges(t, dialDataServer(t, h), tc.request)
			if got != want {
				t.Errorf("data server:\n%s\nnet/http:\n%s", got, want)
			}
		})
	}
}

var dateLine = regexp.MustCompile(`(?m)^Date: .*\r$`)

// exchanges sends request on c, then a request for /next, and returns
// what came back, Date lines blanked, or "[closed]" where the connection
// was closed instead.
func exchanges(t *testing.T, c net.Conn, request string) string {
	t.Helper()
	var out strings.Builder
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	for _, req := range []string{request, "GET /next HTTP/1.1\r\nHost: svc.example\r\n\r\n"} {
		method, _, _ := strings.Cut(req, " ")
		// Written aside: a server may answer before it has read it all.
		go io.WriteString(c, req)
		var got bytes.Buffer
		br := bufio.NewReader(io.TeeReader(c, &got))
		for {
			res, err := http.ReadResponse(br, &http.Request{Method: method})
			if err != nil {
				if isTimeout(err) {
					t.Fatalf("no answer to %q: %v", req, err)
				}
				got.WriteString("[closed]")
				break
			}
			_, _ = io.Copy(io.Discard, res.Body)
			if res.StatusCode >= 200 {
				break
			}
		}
		out.WriteString(dateLine.ReplaceAllString(got.String(), "Date: -\r"))
		out.WriteString("\n---\n")
	}
	return out.String()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// dialNetHTTP serves h with net/http on loopback and returns a connection
// to it.
func dialNetHTTP(t *testing.T, h http.Handler) net.Conn {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dialDataServer serves h on a data connection, as a member does, and
// returns the tunnel server's end of it.
func dialDataServer(t *testing.T, h http.Handler) net.Conn {
	member, server := dataConnPair(t, &sync.Pool{}, nil)
	s := &dataServer{handler: h, log: slog.New(slog.DiscardHandler), track: func(*batchedTLS, http.ConnState) {}, writers: &responseWriters{}}
	var wg sync.WaitGroup
	wg.Go(func() { s.serve(t.Context(), member) })
	t.Cleanup(func() {
		server.Close()
		wg.Wait()
	})
	return server
}

// A handler that outlives watchAfter learns that the tunnel server closed
// its connection (the visitor left) from its request's context, as it
// would from net/http's, once the request's body is behind it.
func TestDataServerCancelsWhenConnectionCloses(t *testing.T) {
	post := "POST /wait HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 5\r\n\r\nhello"
	for _, tc := range []struct {
		name    string
		request string
		first   func(http.ResponseWriter, *http.Request)
		stream  bool // writes as it waits, its errors ignored
	}{
		{"no body", "GET /wait HTTP/1.1\r\nHost: svc.example\r\n\r\n", func(http.ResponseWriter, *http.Request) {}, false},
		{"body read", post, func(w http.ResponseWriter, r *http.Request) { io.ReadAll(r.Body) }, false},
		{"body discarded by a flush", post, func(w http.ResponseWriter, r *http.Request) { w.(http.Flusher).Flush() }, false},
		{"body closed unread", post, func(w http.ResponseWriter, r *http.Request) { r.Body.Close() }, false},
		{"body too large to discard, a stream written", "POST /wait HTTP/1.1\r\nHost: svc.example\r\nContent-Length: 300000\r\n\r\n" + strings.Repeat("z", 300000), func(http.ResponseWriter, *http.Request) {}, true},
	} {
		for _, srv := range []struct {
			name string
			dial func(*testing.T, http.Handler) net.Conn
		}{{"net/http", dialNetHTTP}, {"data server", dialDataServer}} {
			t.Run(tc.name+"/"+srv.name, func(t *testing.T) {
				t.Parallel()
				started, cancelled := make(chan struct{}), make(chan time.Duration, 1)
				c := srv.dial(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					tc.first(w, r)
					close(started)
					t0 := time.Now()
					tick := time.NewTicker(time.Millisecond)
					defer tick.Stop()
					timeout := time.After(5 * time.Second)
					for {
						select {
						case <-r.Context().Done():
							cancelled <- time.Since(t0)
							return
						case <-timeout:
							cancelled <- -1
							return
						case <-tick.C:
							if tc.stream {
								io.WriteString(w, "data: x\n\n")
								w.(http.Flusher).Flush()
							}
						}
					}
				}))
				go io.WriteString(c, tc.request)
				<-started
				time.Sleep(2 * watchAfter)
				c.Close()
				if d := <-cancelled; d < 0 {
					t.Fatal("the handler's context was not cancelled when its connection closed")
				} else {
					t.Logf("cancelled %v after the handler started", d)
				}
			})
		}
	}
}

// The watch timer is armed by the first of a run of requests, not by each:
// a long handler that starts while it is pending, armed by an earlier
// quick request, or after it found the connection idle, still learns that
// the connection closed.
func TestDataServerWatchesAfterQuickRequests(t *testing.T) {
	for _, gap := range []time.Duration{0, watchAfter / 2, watchAfter - time.Millisecond, 2 * watchAfter} {
		t.Run(gap.String(), func(t *testing.T) {
			t.Parallel()
			started, cancelled := make(chan struct{}), make(chan bool, 1)
			c := dialDataServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/quick" {
					io.WriteString(w, "ok")
					return
				}
				close(started)
				select {
				case <-r.Context().Done():
					cancelled <- true
				case <-time.After(5 * time.Second):
					cancelled <- false
				}
			}))
			br := bufio.NewReader(c)
			for range 3 {
				io.WriteString(c, "GET /quick HTTP/1.1\r\nHost: svc.example\r\n\r\n")
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			time.Sleep(gap)
			io.WriteString(c, "GET /wait HTTP/1.1\r\nHost: svc.example\r\n\r\n")
			<-started
			time.Sleep(2 * watchAfter)
			c.Close()
			if !<-cancelled {
				t.Fatal("the handler's context was not cancelled when its connection closed")
			}
		})
	}
}
