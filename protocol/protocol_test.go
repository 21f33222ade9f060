package protocol

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/quic-go/quic-go"
)

// The bytes of the protocol document, which existing peers produce.
var (
	knownRequest = []byte("\x83\xa7Version\xcc\x01\xabTunnelGroup\xa1g\xa8Metadata\x81\xadAuthorization\xa8Bearer t")
	knownResp    = []byte("\x84\xa7Version\xcc\x01\xa4Code\xcc\x00\xa8Metadata\xc0\xa4Body\xc0")
)

func TestWireBytes(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteRequest(&buf, &RegisterRequest{Version: 1, TunnelGroup: "g", Metadata: map[string]string{"Authorization": "Bearer t"}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), knownRequest) {
		t.Errorf("request bytes\n got % x\nwant % x", buf.Bytes(), knownRequest)
	}
	buf.Reset()
	if err := WriteResponse(&buf, &RegisterResponse{Version: 1}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), knownResp) {
		t.Errorf("response bytes\n got % x\nwant % x", buf.Bytes(), knownResp)
	}
}

func TestReadRequest(t *testing.T) {
	tests := []struct {
		name  string
		in    []byte
		group string
		err   bool
	}{
		{"known bytes", knownRequest, "g", false},
		// Version as a positive fixint and as uint64, an unknown key, nil metadata.
		{"other int widths and unknown key", []byte("\x84\xa7Version\x01\xabTunnelGroup\xa2gg\xa5Extra\xc3\xa8Metadata\xc0"), "gg", false},
		{"uint64 version", []byte("\x82\xa7Version\xcf\x00\x00\x00\x00\x00\x00\x00\x01\xabTunnelGroup\xa1x"), "x", false},
		{"version 2", []byte("\x82\xa7Version\x02\xabTunnelGroup\xa1x"), "", true},
		{"no group", []byte("\x81\xa7Version\x01"), "", true},
		{"not msgpack", []byte("GET / HTTP/1.1\r\n\r\n"), "", true},
		{"truncated", knownRequest[:10], "", true},
		{"empty", nil, "", true},
		// msgpack/v5, which existing peers use, also takes a struct as an array.
		{"array form", []byte("\x93\x01\xa1g\xc0"), "g", false},
		{"nil group", []byte("\x82\xa7Version\x01\xabTunnelGroup\xc0"), "", true},
		{"bin group and key", []byte("\x82\xa7Version\x01\xc4\x0bTunnelGroup\xc4\x01g"), "g", false},
		{"str16 group", []byte("\x82\xa7Version\x01\xabTunnelGroup\xda\x00\x01g"), "g", false},
		{"unknown nested keys", []byte("\x83\xa7Version\x01\xa5Extra\x92\x81\xa1k\xc4\x01v\xd6\x01abcd\xabTunnelGroup\xa1g"), "g", false},
		{"array form, wrong length", []byte("\x92\x01\xa1g"), "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := ReadRequest(bytes.NewReader(tt.in))
			if tt.err {
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("got %v, want ErrBadRequest", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if req.TunnelGroup != tt.group {
				t.Fatalf("group %q, want %q", req.TunnelGroup, tt.group)
			}
		})
	}
}

func TestReadRequestIsBounded(t *testing.T) {
	// A map header announcing a huge string must not make the decoder
	// read or allocate past MaxMessageSize.
	in := io.MultiReader(bytes.NewReader([]byte("\x81\xa7Version\xdb\x7f\xff\xff\xff")), neverEnding('a'))
	if _, err := ReadRequest(in); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("got %v, want ErrBadRequest", err)
	}
}

// A few bytes announcing a huge metadata map cost the reader next to
// nothing: msgpack would set aside room for a million entries (80 MiB)
// before finding that none follow.
func TestHugeMetadataCountIsNotPreallocated(t *testing.T) {
	for name, read := range map[string]func(io.Reader) error{
		"request":  func(r io.Reader) error { _, err := ReadRequest(r); return err },
		"response": func(r io.Reader) error { _, err := ReadResponse(r); return err },
	} {
		t.Run(name, func(t *testing.T) {
			msg := []byte("\x81\xa8Metadata\xdf\xff\xff\xff\xff") // map32 of 2^32-1 entries
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			if err := read(bytes.NewReader(msg)); err == nil {
				t.Fatal("accepted")
			}
			runtime.ReadMemStats(&after)
			if grown := after.TotalAlloc - before.TotalAlloc; grown > 1<<20 {
				t.Fatalf("%d bytes made the reader allocate %d KiB", len(msg), grown>>10)
			}
		})
	}
}

func TestHugeStringLengthIsNotPreallocated(t *testing.T) {
	// msgpack sets aside up to 1 MiB for a string or byte slice of the
	// length it announces, before reading any of it: a few bytes per
	// pending registration would each hold that much.
	request := func(r io.Reader) error { _, err := ReadRequest(r); return err }
	response := func(r io.Reader) error { _, err := ReadResponse(r); return err }
	const str32, bin32 = "\xdb\xff\xff\xff\xff", "\xc6\xff\xff\xff\xff"
	for _, tt := range []struct {
		name string
		read func(io.Reader) error
		msg  string
	}{
		{"request tunnel group", request, "\x81\xabTunnelGroup" + str32},
		{"request metadata key", request, "\x81\xa8Metadata\x81" + str32},
		{"request metadata value", request, "\x81\xa8Metadata\x81\xa1k" + str32},
		{"response metadata value", response, "\x81\xa8Metadata\x81\xa1k" + str32},
		{"response body", response, "\x81\xa4Body" + bin32},
		{"control message", func(r io.Reader) error { _, err := NewControlReader(r).Next(); return err }, "\x81\xa4Type" + str32},
		// Keys, and the values of unknown keys (skipped), are strings too.
		{"request key", request, "\x81" + str32},
		{"response key", response, "\x81" + bin32},
		{"control message key", func(r io.Reader) error { _, err := NewControlReader(r).Next(); return err }, "\x81" + str32},
		{"request unknown value", request, "\x81\xa5Extra" + str32},
		{"request unknown nested value", request, "\x81\xa5Extra\x91\x81\xa1k" + bin32},
		{"response unknown ext value", response, "\x81\xa5Extra\xc9\xff\xff\xff\xff\x01"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			if err := tt.read(strings.NewReader(tt.msg)); err == nil {
				t.Fatal("accepted")
			}
			runtime.ReadMemStats(&after)
			if grown := after.TotalAlloc - before.TotalAlloc; grown > 256<<10 {
				t.Fatalf("%d bytes made the reader allocate %d KiB", len(tt.msg), grown>>10)
			}
		})
	}
}

type neverEnding byte

func (b neverEnding) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}

func TestReadResponseCodes(t *testing.T) {
	for code, want := range map[ResponseCode]error{ResponseBadRequest: ErrBadRequest, ResponseNotFound: ErrNotFound, ResponseUnauthorized: ErrUnauthorized} {
		var buf bytes.Buffer
		_ = WriteResponse(&buf, &RegisterResponse{Version: 1, Code: code})
		if _, err := ReadResponse(&buf); !errors.Is(err, want) {
			t.Errorf("code %d: got %v, want %v", code, err, want)
		}
	}
	if _, err := ReadResponse(bytes.NewReader(knownResp)); err != nil {
		t.Fatal(err)
	}
}

func TestCloseError(t *testing.T) {
	remote := func(code quic.ApplicationErrorCode, msg string) error {
		return fmt.Errorf("wrapped: %w", &quic.ApplicationError{Remote: true, ErrorCode: code, ErrorMessage: msg})
	}
	tests := []struct {
		in   error
		want error
	}{
		{remote(CodeClientError, "unauthorized"), ErrUnauthorized},
		{remote(CodeClientError, "not found"), ErrNotFound},
		{remote(CodeClientError, "bad request"), ErrBadRequest},
	}
	for _, tt := range tests {
		got := CloseError(tt.in)
		var appErr *quic.ApplicationError
		if !errors.Is(got, tt.want) || !errors.As(got, &appErr) {
			t.Errorf("CloseError(%v) = %v, want %v wrapping the QUIC error", tt.in, got, tt.want)
		}
	}
	for _, in := range []error{remote(CodeServerError, "unauthorized"), remote(CodeOK, ""), errors.New("x"),
		&quic.ApplicationError{ErrorCode: CodeClientError, ErrorMessage: "unauthorized"}} {
		if got := CloseError(in); got != in {
			t.Errorf("CloseError(%v) = %v, want it unchanged", in, got)
		}
	}
}

func TestControlMessages(t *testing.T) {
	var buf bytes.Buffer
	_ = WriteControl(&buf, &ControlMessage{Type: "future"})
	_ = WriteControl(&buf, &ControlMessage{Type: ControlDrain})
	r := NewControlReader(&buf)
	for _, want := range []string{"future", ControlDrain} {
		msg, err := r.Next()
		if err != nil || msg.Type != want {
			t.Fatalf("got %v %v, want %q", msg, err, want)
		}
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("at end: %v, want EOF", err)
	}
}

func FuzzReadRequest(f *testing.F) {
	f.Add(knownRequest)
	f.Add(knownResp)
	f.Add([]byte("\x82\xa7Version\x01\xabTunnelGroup\xa1x"))
	f.Fuzz(func(t *testing.T, in []byte) {
		req, err := ReadRequest(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error %v does not wrap ErrBadRequest", err)
			}
			return
		}
		if req.Version != Version || req.TunnelGroup == "" {
			t.Fatalf("accepted invalid request %+v", req)
		}
		// What was accepted survives a round trip.
		var buf bytes.Buffer
		if err := WriteRequest(&buf, req); err != nil {
			t.Fatal(err)
		}
		again, err := ReadRequest(&buf)
		if err != nil || again.TunnelGroup != req.TunnelGroup || len(again.Metadata) != len(req.Metadata) {
			t.Fatalf("round trip: %+v %v, want %+v", again, err, req)
		}
	})
}

// The data connection hello is the token and a newline, read back exactly,
// leaving what follows for HTTP; anything else is a bad request.
func TestDataHello(t *testing.T) {
	token := NewDataToken()
	if len(token) != DataTokenSize || token == NewDataToken() {
		t.Fatalf("token %q", token)
	}
	var buf bytes.Buffer
	if err := WriteDataHello(&buf, token); err != nil {
		t.Fatal(err)
	}
	buf.WriteString("GET / HTTP/1.1\r\n")
	got, err := ReadDataHello(&buf)
	if err != nil || got != token {
		t.Fatalf("ReadDataHello = %q, %v", got, err)
	}
	if rest := buf.String(); rest != "GET / HTTP/1.1\r\n" {
		t.Errorf("left %q", rest)
	}

	if err := WriteDataHello(io.Discard, "short"); !errors.Is(err, ErrBadRequest) {
		t.Errorf("WriteDataHello(short) = %v", err)
	}
	for _, in := range []string{"", token, token + "x", strings.Repeat("a", 10)} {
		if _, err := ReadDataHello(strings.NewReader(in)); !errors.Is(err, ErrBadRequest) {
			t.Errorf("ReadDataHello(%q) = %v, want ErrBadRequest", in, err)
		}
	}
}

// A client may write control messages right behind its register request;
// reading the request must leave them on the stream, which is no
// io.ByteScanner (msgpack buffers, and so reads ahead of, any other
// reader).
func TestReadRequestLeavesWhatFollows(t *testing.T) {
	var buf bytes.Buffer
	_ = WriteRequest(&buf, &RegisterRequest{Version: 1, TunnelGroup: "g", Metadata: map[string]string{"k": "v"}})
	_ = WriteControl(&buf, &ControlMessage{Type: ControlDrain})
	stream := struct{ io.Reader }{&buf}
	req, err := ReadRequest(stream)
	if err != nil || req.TunnelGroup != "g" || req.Metadata["k"] != "v" {
		t.Fatalf("ReadRequest = %+v, %v", req, err)
	}
	msg, err := NewControlReader(stream).Next()
	if err != nil || msg.Type != ControlDrain {
		t.Fatalf("the control message behind the request: %+v, %v", msg, err)
	}
}
