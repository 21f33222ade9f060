package tunnel_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/quic-go/qpack"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// heapInUse returns the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TCP connections to the data port that never send a byte (no TLS, no
// token: anyone can open them) hold no read batch while the handshake
// waits.
func TestSilentDataConnectionsHoldNoBuffer(t *testing.T) {
	e := startServerWith(t, func(s *tunnel.Server) { s.RegisterTimeout = 5 * time.Second }, svc)
	before := heapInUse()
	const conns = 200
	for range conns {
		c, err := net.Dial("tcp", e.dataAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	time.Sleep(500 * time.Millisecond)
	grown := int64(heapInUse()) - int64(before)
	t.Logf("heap grew by %d MiB for %d silent TCP connections", grown>>20, conns)
	if grown > 16<<20 {
		t.Fatalf("%d silent TCP connections to the data port hold %d MiB of the server's heap", conns, grown>>20)
	}
}

// rawDataMember registers a hand-made member with one data connection,
// on which answer writes the response to every request.
func rawDataMember(t *testing.T, e *env, answer string) {
	t.Helper()
	rawDataConns(t, e, 1, answerEach(func(c net.Conn, _ *http.Request) { io.WriteString(c, answer) }))
}

// rawH3Member registers a hand-made member on QUIC only that answers every
// request stream with one HEADERS frame carrying status.
func rawH3Member(t *testing.T, e *env, status string) {
	t.Helper()
	conn, _, _ := e.registerRaw(t, "svc", nil, &quic.Config{MaxIdleTimeout: 10 * time.Second, KeepAlivePeriod: time.Second})
	e.waitMembers(t, "svc", func(n int) bool { return n == 1 })
	var block bytes.Buffer
	enc := qpack.NewEncoder(&block)
	enc.WriteField(qpack.HeaderField{Name: ":status", Value: status})
	enc.WriteField(qpack.HeaderField{Name: "content-length", Value: "0"})
	frame := quicvarint.Append(nil, 0x1) // HEADERS
	frame = quicvarint.Append(frame, uint64(block.Len()))
	frame = append(frame, block.Bytes()...)
	go func() {
		for {
			str, err := conn.AcceptStream(context.Background())
			if err != nil {
				return
			}
			go func() {
				time.Sleep(50 * time.Millisecond) // the request's HEADERS
				str.Write(frame)
				str.Close()
			}()
		}
	}()
}

// A member answering with a status net/http cannot write (000-099 on a
// data connection; 0, negative or over 999 on HTTP/3) gets its visitor a
// 502, and its slot back; WriteHeader would panic on the status.
func TestInvalidStatusFromMember(t *testing.T) {
	check := func(t *testing.T, e *env) {
		req, _ := http.NewRequest(http.MethodGet, e.frontend+"/", nil)
		req.Host = "svc.example"
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Errorf("visitor got %v, want a 502", err)
		} else {
			res.Body.Close()
			if res.StatusCode != http.StatusBadGateway {
				t.Errorf("visitor got %d, want 502", res.StatusCode)
			}
		}
		time.Sleep(100 * time.Millisecond)
		if n := inFlight(e.srv); n != 0 {
			t.Errorf("%d requests still in flight on the member after the answer", n)
		}
	}
	t.Run("data", func(t *testing.T) {
		e := startServer(t, svc)
		rawDataMember(t, e, "HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n")
		check(t, e)
	})
	for _, status := range []string{"0", "-1", "1000"} {
		t.Run("quic "+status, func(t *testing.T) {
			e := startServer(t, svc)
			rawH3Member(t, e, status)
			check(t, e)
		})
	}
}

// A member that opens a bidirectional stream towards the server, which
// HTTP/3 forbids, is closed, rather than have what the stream carries kept
// unread (up to 768 KiB) for the life of its registration.
func TestMemberStreamsTowardsServerRefused(t *testing.T) {
	e := startServer(t, svc)
	conn, _, _ := e.registerRaw(t, "svc", nil, &quic.Config{MaxIdleTimeout: 10 * time.Second, KeepAlivePeriod: time.Second})
	str, err := conn.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() {
		chunk := make([]byte, 16<<10)
		for {
			if _, err := str.Write(chunk); err != nil {
				written <- err
				return
			}
		}
	}()
	select {
	case err := <-written:
		t.Logf("refused: %v", err) // reset, or the connection closed
	case <-time.After(3 * time.Second):
		t.Fatalf("after 3 s the server neither reset the member's stream nor closed its connection; it holds %d KiB of it unread",
			conn.ConnectionStats().BytesSent>>10)
	}
}

// rawDataConns registers a hand-made member with n data connections, each
// served by serve.
func rawDataConns(t *testing.T, e *env, n int, serve func(c net.Conn)) {
	t.Helper()
	_, _, resp := e.registerRaw(t, "svc", map[string]string{protocol.MetadataData: protocol.DataHTTP1}, &quic.Config{MaxIdleTimeout: 10 * time.Second, KeepAlivePeriod: time.Second})
	e.waitMembers(t, "svc", func(n int) bool { return n == 1 })
	for range n {
		go serve(dialData(t, e, resp.Metadata[protocol.MetadataData]))
	}
	deadline := time.Now().Add(5 * time.Second)
	for got := e.dataConns("svc"); len(got) != 1 || got[0] != n; got = e.dataConns("svc") {
		if time.Now().After(deadline) {
			t.Fatalf("data connections: %v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dialData opens a data connection with token and returns it once the
// server has taken its hello.
func dialData(t *testing.T, e *env, token string) net.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", e.dataAddr, &tls.Config{RootCAs: e.roots, ServerName: "localhost", NextProtos: []string{protocol.DataALPN}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := protocol.WriteDataHello(c, token); err != nil {
		t.Fatal(err)
	}
	var ok [1]byte
	if _, err := io.ReadFull(c, ok[:]); err != nil || ok[0] != protocol.DataOK {
		t.Fatalf("data hello: %v", err)
	}
	return c
}

// answerEach serves a data connection by reading requests and having
// answer write the response to each.
func answerEach(answer func(c net.Conn, req *http.Request)) func(net.Conn) {
	return func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			answer(c, req)
		}
	}
}

// Bytes a member sends after a complete answer (a body after a 204, say)
// that arrive a moment later, once the server has checked the connection
// and pooled it, must not be read as the answer to the next request on
// it, a GET as well as a POST: they would give one visitor an answer
// meant for another.
func TestLateUnaskedBytesNotReadAsNextAnswer(t *testing.T) {
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		t.Run(method, func(t *testing.T) {
			e := startServer(t, svc)
			late := make(chan struct{})
			rawDataConns(t, e, 2, answerEach(func(c net.Conn, req *http.Request) {
				if req.URL.Path == "/first" {
					io.WriteString(c, "HTTP/1.1 204 No Content\r\n\r\n")
					time.Sleep(20 * time.Millisecond)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED")
					close(late)
					return
				}
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
			}))
			if code, _ := e.get(t, "svc.example", "/first"); code != http.StatusNoContent {
				t.Fatalf("first: %d", code)
			}
			select {
			case <-late:
			case <-time.After(5 * time.Second):
				t.Fatal("the member did not send its late bytes")
			}
			time.Sleep(20 * time.Millisecond) // they cross the loopback
			res := e.do(t, e.newRequest(t, t.Context(), method, "/next", nil))
			if body, _ := io.ReadAll(res.Body); string(body) != "second" {
				t.Fatalf("next visitor got %d %q, the bytes the member sent after the first answer", res.StatusCode, body)
			}
		})
	}
}
