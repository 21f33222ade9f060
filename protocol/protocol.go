// Package protocol defines the reverst tunnel wire protocol, shared by the
// tunnel server and the client library.
//
// # Wire format
//
// A tunnel client dials the server over QUIC with TLS 1.3 and the ALPN
// protocol [ALPN] ("quic-h3-tunnel"). On the first bidirectional stream it
// opens, it writes one MessagePack map, the [RegisterRequest]:
//
//	{"Version": 1, "TunnelGroup": "name", "Metadata": {"Authorization": "Basic ..."}}
//
// Keys are the Go field names as strings; integers may have any width and
// unknown keys are ignored. Credentials travel in Metadata["Authorization"]
// as "SCHEME PAYLOAD", exactly like the HTTP header.
//
// On success the server answers on the same stream with one MessagePack map,
// the [RegisterResponse] ({"Version": 1, "Code": 0, "Metadata": nil,
// "Body": nil}), and closes its side of the stream. From then on the roles
// flip: the server is the HTTP/3 client on the connection and the tunnel
// client serves HTTP/3 on it.
//
// # Keep-alive announcement (an extension)
//
// A client may put in Metadata[[MetadataKeepAlive]] the period of its QUIC
// keep-alives, as a Go duration ("250ms"). A server that knows the key
// then treats a connection from which nothing arrived for several periods
// as dead, and drops it at once instead of waiting for the QUIC idle
// timeout (which quic-go never lets a peer lower below 5 s). Older servers
// ignore the key; a client that does not announce keeps the transport's
// idle timeout.
//
// # Draining (an extension)
//
// The register stream stays open after the response. A client that is about
// to leave writes a [ControlMessage] {"Type": "drain"} on its side of that
// stream; the server then sends it no new requests, while the requests
// already sent finish, and the client closes the connection with [CodeOK]
// once it is idle. Peers that do not know the extension are unaffected: an
// older server never reads the stream after the request (the few bytes sit
// in flow control), and an older client never writes on it. Unknown message
// types are ignored, and the end of the stream means nothing.
//
// # Upgrades (an extension)
//
// A visitor's HTTP/1.1 Upgrade request (WebSocket and the like) cannot be
// expressed as an HTTP/3 request. The server sends it as an extended
// CONNECT (RFC 9220) with the :protocol [UpgradeProtocol]; a client that
// knows the extension answers 200 and then treats the request stream as a
// raw HTTP/1.1 connection on which the server writes the visitor's
// original request and relays the bytes both ways. Any other answer means
// the client does not support upgrades, and the visitor gets a 502.
//
// # Data connections (an extension)
//
// quic-go sends at most 1452 bytes per datagram, and that per-packet cost
// bounds bulk transfers; its stream hand-offs add latency. A client that
// can serve HTTP/1.1 on TCP puts [DataHTTP1] in Metadata[[MetadataData]]
// of its register request. A server that accepts data connections answers
// with a token in the same key of the response Metadata: 43 characters,
// base64url (no padding) of 32 random bytes, valid while that
// registration lives.
//
// The client then opens TCP connections to the IP address and port number
// its QUIC connection reached, runs TLS 1.3 on each with the ALPN
// [DataALPN] and the same server verification, and writes the token
// followed by "\n". The server answers one byte, [DataOK], or closes the
// connection when it does not know the token. From then on the roles are
// those of the QUIC connection: the server sends HTTP/1.1 requests on the
// connection, one at a time, and the client answers them; either side may
// close it between requests. The client keeps a few connections idle and
// opens more as they get busy; the server closes those it does not need,
// and sends a request over QUIC when no data connection is idle.
// Upgrades, keep-alives, control messages and the registration's lifetime
// stay with QUIC: closing the QUIC connection ends its data connections.
// Peers that do not know the key ignore it and use QUIC alone.
//
// On failure the server does not answer: it closes the QUIC connection with
// an application error code ([CodeOK], [CodeServerError], [CodeClientError])
// and a reason. For client errors the reason is exactly one of
// "unauthorized", "not found" or "bad request"; [CloseError] turns such a
// close back into [ErrUnauthorized], [ErrNotFound] or [ErrBadRequest].
package protocol

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/quic-go/quic-go"
	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// ALPN is the TLS application protocol negotiated by tunnel connections.
const ALPN = "quic-h3-tunnel"

// Version is the protocol version this package speaks.
const Version = 1

// MaxMessageSize bounds a register request or response on the wire. Real
// messages are a few hundred bytes; the bound keeps a hostile peer from
// making the decoder allocate.
const MaxMessageSize = 64 << 10

// Application error codes used when closing a tunnel connection.
const (
	// CodeOK is a normal close: the peer is going away.
	CodeOK quic.ApplicationErrorCode = 0x0
	// CodeServerError is a server-side failure; the client may retry.
	CodeServerError quic.ApplicationErrorCode = 0x1
	// CodeClientError rejects the client's request; the reason says why.
	CodeClientError quic.ApplicationErrorCode = 0x2
)

// Reasons sent with [CodeClientError].
const (
	ReasonUnauthorized = "unauthorized"
	ReasonNotFound     = "not found"
	ReasonBadRequest   = "bad request"
)

// Errors a registration can end with. They are matched with errors.Is.
var (
	ErrUnauthorized = errors.New(ReasonUnauthorized)
	ErrNotFound     = errors.New(ReasonNotFound)
	ErrBadRequest   = errors.New(ReasonBadRequest)
)

// ResponseCode is the Code field of a [RegisterResponse]. Current servers
// only ever send [ResponseOK]; the other values exist in older peers.
type ResponseCode uint8

// Legacy response codes.
const (
	ResponseOK ResponseCode = iota
	ResponseBadRequest
	ResponseNotFound
	ResponseUnauthorized
	ResponseServerError
)

// RegisterRequest is the first message a tunnel client sends.
type RegisterRequest struct {
	Version     uint8
	TunnelGroup string
	Metadata    map[string]string
}

// RegisterResponse is the server's answer to a successful registration.
type RegisterResponse struct {
	Version  uint8
	Code     ResponseCode
	Metadata map[string]string
	Body     []byte
}

// UpgradeProtocol is the extended CONNECT :protocol of a stream that
// carries a raw HTTP/1.1 connection for an upgraded request.
const UpgradeProtocol = "reverst-http1"

// ControlMessage travels on the client's side of the register stream after
// the register request.
type ControlMessage struct {
	Type string
}

// MetadataKeepAlive is the register-request metadata key announcing the
// client's keep-alive period.
const MetadataKeepAlive = "Reverst-Keep-Alive"

// Data connections (see the package documentation).
const (
	// MetadataData is the metadata key that asks for data connections in
	// a register request, and carries their token in a register response.
	MetadataData = "Reverst-Data"
	// DataHTTP1 is the request's value: HTTP/1.1 over TLS over TCP.
	DataHTTP1 = "http/1.1"
	// DataALPN is the TLS application protocol of a data connection.
	DataALPN = "reverst-data"
	// DataOK is the server's one-byte answer to a known token.
	DataOK byte = 0
	// DataTokenSize is the length of a token on the wire.
	DataTokenSize = 43
)

// NewDataToken returns a fresh random token.
func NewDataToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails, as documented
	return base64.RawURLEncoding.EncodeToString(b)
}

// WriteDataHello writes the client's first bytes on a data connection.
func WriteDataHello(w io.Writer, token string) error {
	if len(token) != DataTokenSize {
		return fmt.Errorf("%w: data token of %d bytes", ErrBadRequest, len(token))
	}
	_, err := io.WriteString(w, token+"\n")
	return err
}

// ReadDataHello reads the token a client sent on a data connection. It
// reads exactly the hello's bytes, so that r can carry on with HTTP.
func ReadDataHello(r io.Reader) (string, error) {
	var buf [DataTokenSize + 1]byte
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return "", fmt.Errorf("%w: data hello: %w", ErrBadRequest, err)
	}
	if buf[DataTokenSize] != '\n' {
		return "", fmt.Errorf("%w: data hello not terminated", ErrBadRequest)
	}
	return string(buf[:DataTokenSize]), nil
}

// ControlDrain announces that the client leaves: send it no new requests.
const ControlDrain = "drain"

// WriteControl encodes msg onto w.
func WriteControl(w io.Writer, msg *ControlMessage) error {
	return msgpack.NewEncoder(w).Encode(msg)
}

// ControlReader decodes the control messages following a register request.
type ControlReader struct {
	dec *msgpack.Decoder
}

// NewControlReader reads control messages from r, at most
// [MaxMessageSize] bytes over its whole life: the stream carries a handful
// of tiny messages, so more is a misbehaving peer.
func NewControlReader(r io.Reader) *ControlReader {
	// Without a reader of our own msgpack would keep a 4 KiB buffer for the
	// life of every tunnel, for messages of a few bytes.
	return &ControlReader{dec: msgpack.NewDecoder(bufio.NewReaderSize(io.LimitReader(r, MaxMessageSize), 64))}
}

// Next returns the next message; io.EOF when the peer closed the stream.
func (c *ControlReader) Next() (*ControlMessage, error) {
	var typ boundedString
	if err := decodeStruct(c.dec, field{"Type", &typ}); err != nil {
		return nil, err
	}
	return &ControlMessage{Type: string(typ)}, nil
}

// Authorization returns the credentials presented in the request metadata.
func (r *RegisterRequest) Authorization() string {
	return r.Metadata["Authorization"]
}

// WriteRequest encodes req onto w.
func WriteRequest(w io.Writer, req *RegisterRequest) error {
	return msgpack.NewEncoder(w).Encode(req)
}

// WriteResponse encodes resp onto w.
func WriteResponse(w io.Writer, resp *RegisterResponse) error {
	return msgpack.NewEncoder(w).Encode(resp)
}

// ReadRequest decodes one register request from r, reading at most
// [MaxMessageSize] bytes and none past the request: what follows on the
// stream (control messages) is left for the caller. Every failure wraps
// [ErrBadRequest].
func ReadRequest(r io.Reader) (*RegisterRequest, error) {
	var wire struct {
		Version     uint8
		TunnelGroup boundedString
		Metadata    metadata
	}
	if err := decode(r, field{"Version", &wire.Version}, field{"TunnelGroup", &wire.TunnelGroup}, field{"Metadata", &wire.Metadata}); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	req := RegisterRequest{Version: wire.Version, TunnelGroup: string(wire.TunnelGroup), Metadata: wire.Metadata}
	if req.Version != Version {
		return nil, fmt.Errorf("%w: unsupported version %d", ErrBadRequest, req.Version)
	}
	if req.TunnelGroup == "" {
		return nil, fmt.Errorf("%w: empty tunnel group", ErrBadRequest)
	}
	return &req, nil
}

// ReadResponse decodes one register response from r. A response whose code
// is not [ResponseOK] is returned with the matching error.
func ReadResponse(r io.Reader) (*RegisterResponse, error) {
	var wire struct {
		Version  uint8
		Code     ResponseCode
		Metadata metadata
		Body     boundedBytes
	}
	if err := decode(r, field{"Version", &wire.Version}, field{"Code", &wire.Code}, field{"Metadata", &wire.Metadata}, field{"Body", &wire.Body}); err != nil {
		return nil, fmt.Errorf("decoding register response: %w", err)
	}
	resp := RegisterResponse{Version: wire.Version, Code: wire.Code, Metadata: wire.Metadata, Body: []byte(wire.Body)}
	switch resp.Code {
	case ResponseOK:
		return &resp, nil
	case ResponseBadRequest:
		return &resp, ErrBadRequest
	case ResponseNotFound:
		return &resp, ErrNotFound
	case ResponseUnauthorized:
		return &resp, ErrUnauthorized
	default:
		return &resp, fmt.Errorf("register response: server error (code %d)", resp.Code)
	}
}

// metadata decodes a metadata map without trusting the size it announces,
// for which msgpack would set aside room (up to a million entries) before
// reading any: a few bytes would cost the reader tens of MiB.
type metadata map[string]string

func (m *metadata) DecodeMsgpack(dec *msgpack.Decoder) error {
	n, err := dec.DecodeMapLen()
	if err != nil {
		return err
	}
	if n < 0 {
		*m = nil
		return nil
	}
	// An entry takes two bytes at least.
	if n > MaxMessageSize/2 {
		return fmt.Errorf("metadata of %d entries", n)
	}
	mm := make(map[string]string, min(n, 16))
	for range n {
		k, err := readBounded(dec)
		if err != nil {
			return err
		}
		v, err := readBounded(dec)
		if err != nil {
			return err
		}
		mm[string(k)] = string(v)
	}
	*m = mm
	return nil
}

// boundedString and boundedBytes decode as string and []byte do, without
// trusting the length announced either: msgpack sets aside room for it
// before reading any (up to 1 MiB for a string, all of it for bytes).
type (
	boundedString string
	boundedBytes  []byte
)

func (s *boundedString) DecodeMsgpack(dec *msgpack.Decoder) error {
	b, err := readBounded(dec)
	*s = boundedString(b)
	return err
}

func (b *boundedBytes) DecodeMsgpack(dec *msgpack.Decoder) error {
	v, err := readBounded(dec)
	*b = v
	return err
}

// readBounded reads a msgpack string or binary (nil for a msgpack nil) no
// longer than a whole message may be.
func readBounded(dec *msgpack.Decoder) ([]byte, error) {
	n, err := dec.DecodeBytesLen()
	if err != nil || n < 0 {
		return nil, err
	}
	if n > MaxMessageSize {
		return nil, fmt.Errorf("string of %d bytes", n)
	}
	b := make([]byte, n)
	if err := dec.ReadFull(b); err != nil {
		return nil, err
	}
	return b, nil
}

// field is a key of a message and where its value is decoded.
type field struct {
	name string
	v    any
}

// maxSkipDepth bounds the nesting of an unknown value: real peers send
// none, and each level is a frame of skip's recursion.
const maxSkipDepth = 16

// decodeStruct decodes a message as msgpack decodes a struct with these
// fields (a map keyed by field name, nil, or an array of every field in
// order), except that keys and the values of unknown keys are read with
// readBounded: msgpack reads both setting aside up to 1 MiB for the length
// they announce, before reading any of it.
func decodeStruct(dec *msgpack.Decoder, fields ...field) error {
	c, err := dec.PeekCode()
	if err != nil {
		return err
	}
	if msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32 {
		n, err := dec.DecodeArrayLen()
		if err != nil || n <= 0 {
			return err
		}
		if n != len(fields) {
			return fmt.Errorf("array of %d values for a message of %d fields", n, len(fields))
		}
		for _, f := range fields {
			if err := dec.Decode(f.v); err != nil {
				return err
			}
		}
		return nil
	}
	n, err := dec.DecodeMapLen()
	if err != nil {
		return err
	}
	for range n {
		key, err := readBounded(dec)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(fields, func(f field) bool { return f.name == string(key) })
		if i < 0 {
			err = skip(dec, 0)
		} else {
			err = dec.Decode(fields[i].v)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// skip reads past one value as msgpack's Skip does, with strings, binaries
// and extensions read by readBounded.
func skip(dec *msgpack.Decoder, depth int) error {
	if depth > maxSkipDepth {
		return fmt.Errorf("value nested over %d levels", maxSkipDepth)
	}
	c, err := dec.PeekCode()
	if err != nil {
		return err
	}
	n := 0
	switch {
	case msgpcode.IsString(c) || msgpcode.IsBin(c):
		_, err = readBounded(dec)
		return err
	case msgpcode.IsExt(c):
		_, size, err := dec.DecodeExtHeader()
		if err != nil {
			return err
		}
		if size > MaxMessageSize {
			return fmt.Errorf("extension of %d bytes", size)
		}
		return dec.ReadFull(make([]byte, size))
	case msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32:
		n, err = dec.DecodeMapLen()
		n *= 2
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		n, err = dec.DecodeArrayLen()
	default: // numbers, nil and booleans: a few bytes at most
		return dec.Skip()
	}
	if err != nil {
		return err
	}
	// Every value takes a byte at least, so a made-up count ends at the
	// end of the message.
	for range n {
		if err := skip(dec, depth+1); err != nil {
			return err
		}
	}
	return nil
}

func decode(r io.Reader, fields ...field) error {
	dec := msgpack.NewDecoder(&unbufferedReader{r: io.LimitReader(r, MaxMessageSize)})
	if err := decodeStruct(dec, fields...); err != nil {
		if errors.Is(err, io.EOF) {
			return io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// unbufferedReader is the io.ByteScanner msgpack wants, without a buffer:
// msgpack wraps any other reader in a bufio.Reader, which reads ahead of
// the message, and a register request may be followed on its stream by
// control messages that the caller reads next.
type unbufferedReader struct {
	r      io.Reader
	b      [1]byte
	read   bool // b holds the last byte ReadByte returned
	unread bool // and UnreadByte gave it back
}

func (u *unbufferedReader) Read(p []byte) (int, error) {
	if len(p) > 0 && u.unread {
		p[0], u.unread, u.read = u.b[0], false, false
		return 1, nil
	}
	u.read = false
	return u.r.Read(p)
}

func (u *unbufferedReader) ReadByte() (byte, error) {
	if u.unread {
		u.unread = false
		return u.b[0], nil
	}
	u.read = false
	if _, err := io.ReadFull(u.r, u.b[:]); err != nil {
		return 0, err
	}
	u.read = true
	return u.b[0], nil
}

func (u *unbufferedReader) UnreadByte() error {
	if !u.read || u.unread {
		return bufio.ErrInvalidUnreadByte
	}
	u.unread = true
	return nil
}

// CloseError maps the error a peer closed the connection with to one of the
// sentinel errors, wrapping it so that the QUIC error stays reachable with
// errors.As. Errors that are not client errors are returned unchanged.
func CloseError(err error) error {
	var appErr *quic.ApplicationError
	if !errors.As(err, &appErr) || !appErr.Remote || appErr.ErrorCode != CodeClientError {
		return err
	}
	switch appErr.ErrorMessage {
	case ReasonUnauthorized:
		return fmt.Errorf("%w (%w)", ErrUnauthorized, err)
	case ReasonNotFound:
		return fmt.Errorf("%w (%w)", ErrNotFound, err)
	case ReasonBadRequest:
		return fmt.Errorf("%w (%w)", ErrBadRequest, err)
	}
	return err
}
