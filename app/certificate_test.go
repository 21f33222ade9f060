package app

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/reverst-dev/reverst/internal/testnet"
	"github.com/reverst-dev/reverst/internal/testpki"
	"github.com/reverst-dev/reverst/protocol"
)

// servedCert starts a TLS listener on k and returns the serial number of
// the certificate a real handshake gets.
func servedCert(t *testing.T, k *keyPair) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: k.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func serial(p *testpki.PKI) string { return p.Cert.Leaf.SerialNumber.String() }

// fakeClock is a time source that tests move.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// writePair writes the PEM files of a pair, each with its own
// modification time, as a renewal would.
func writePair(t *testing.T, certPath, keyPath string, certPEM, keyPEM []byte, mod time.Time) {
	t.Helper()
	for path, data := range map[string][]byte{certPath: certPEM, keyPath: keyPEM} {
		if data == nil {
			continue
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
}

func TestKeyPairFollowsRenewal(t *testing.T) {
	dir := t.TempDir()
	first, second := testpki.New(t), testpki.NewExpiring(t, time.Now().Add(90*24*time.Hour))
	certPath, keyPath := first.WriteFiles(t, dir)
	var logs bytes.Buffer
	clock := &fakeClock{t: time.Now()}
	k := &keyPair{
		certPath: certPath, keyPath: keyPath, flags: "the pair",
		log: slog.New(slog.NewTextHandler(&logs, nil)),
		now: clock.now,
	}
	if _, err := k.load(); err != nil {
		t.Fatal(err)
	}
	if got := servedCert(t, k); got != serial(first) {
		t.Fatalf("serves %s, want the first certificate %s", got, serial(first))
	}

	// A renewal that writes the certificate before the key: in between,
	// the files do not make a pair, and the previous one stays.
	mod := time.Now().Add(time.Minute)
	writePair(t, certPath, keyPath, second.CertPEM, nil, mod)
	clock.advance(keyPairCheck)
	if got := servedCert(t, k); got != serial(first) {
		t.Fatalf("with a certificate and the previous key, serves %s, want the previous pair %s", got, serial(first))
	}
	clock.advance(keyPairCheck)
	servedCert(t, k)
	if n := strings.Count(logs.String(), "do not load"); n != 1 {
		t.Fatalf("a mismatched pair reported %d times over two checks, want once:\n%s", n, logs.String())
	}

	writePair(t, certPath, keyPath, nil, second.KeyPEM, mod)
	if got := servedCert(t, k); got != serial(first) {
		t.Fatalf("serves %s before the next check, want still %s", got, serial(first))
	}
	clock.advance(keyPairCheck)
	if got := servedCert(t, k); got != serial(second) {
		t.Fatalf("serves %s after the renewal, want the second certificate %s", got, serial(second))
	}
	if got, want := k.NotAfter(), float64(second.Cert.Leaf.NotAfter.Unix()); got != want {
		t.Fatalf("NotAfter = %v, want the renewed certificate's %v", got, want)
	}
	if !strings.Contains(logs.String(), "certificate reloaded") {
		t.Fatalf("no reload logged:\n%s", logs.String())
	}
}

// The expiry gauge follows a renewal on a server that makes no handshake.
func TestKeyPairNotAfterWithoutHandshakes(t *testing.T) {
	dir := t.TempDir()
	first, second := testpki.New(t), testpki.NewExpiring(t, time.Now().Add(90*24*time.Hour))
	certPath, keyPath := first.WriteFiles(t, dir)
	clock := &fakeClock{t: time.Now()}
	k := &keyPair{certPath: certPath, keyPath: keyPath, flags: "the pair", log: slog.New(slog.DiscardHandler), now: clock.now}
	if _, err := k.load(); err != nil {
		t.Fatal(err)
	}
	if got, want := k.NotAfter(), float64(first.Cert.Leaf.NotAfter.Unix()); got != want {
		t.Fatalf("NotAfter = %v, want %v", got, want)
	}
	writePair(t, certPath, keyPath, second.CertPEM, second.KeyPEM, time.Now().Add(time.Minute))
	clock.advance(keyPairCheck)
	if got, want := k.NotAfter(), float64(second.Cert.Leaf.NotAfter.Unix()); got != want {
		t.Fatalf("NotAfter = %v after the renewal, want %v", got, want)
	}
}

func TestKeyPairFollowsSecretVolumeSwap(t *testing.T) {
	// The kubelet writes a Secret's new version into a new directory and
	// swaps the symbolic link the files are reached through.
	dir := t.TempDir()
	first, second := testpki.New(t), testpki.New(t)
	v1, v2 := filepath.Join(dir, "..v1"), filepath.Join(dir, "..v2")
	for _, v := range []string{v1, v2} {
		if err := os.Mkdir(v, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	first.WriteFiles(t, v1)
	second.WriteFiles(t, v2)
	data := filepath.Join(dir, "..data")
	if err := os.Symlink("..v1", data); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"cert.pem", "key.pem"} {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	clock := &fakeClock{t: time.Now()}
	k := &keyPair{
		certPath: filepath.Join(dir, "cert.pem"), keyPath: filepath.Join(dir, "key.pem"), flags: "the pair",
		log: slog.New(slog.DiscardHandler), now: clock.now,
	}
	if _, err := k.load(); err != nil {
		t.Fatal(err)
	}
	if got := servedCert(t, k); got != serial(first) {
		t.Fatalf("serves %s, want %s", got, serial(first))
	}
	// The kubelet's atomic swap: a new link renamed over the old one.
	if err := os.Symlink("..v2", data+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(data+".tmp", data); err != nil {
		t.Fatal(err)
	}
	clock.advance(keyPairCheck)
	if got := servedCert(t, k); got != serial(second) {
		t.Fatalf("serves %s after the swap, want %s", got, serial(second))
	}
}

func TestKeyPairLoadErrorNamesFlags(t *testing.T) {
	k := &keyPair{certPath: "/nonexistent/cert.pem", keyPath: "/nonexistent/key.pem", flags: "--certificate-path and --private-key-path", log: slog.New(slog.DiscardHandler)}
	_, err := k.load()
	if err == nil || !strings.Contains(err.Error(), "--certificate-path and --private-key-path") {
		t.Fatalf("load: %v, want an error naming the flags", err)
	}
}

// servedOver dials addr with TLS and returns the certificate's serial.
func servedOver(t *testing.T, addr string, conf *tls.Config) string {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, conf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

// The tunnel's QUIC listener, its data connections and the HTTPS frontend
// all take a renewed certificate without a restart.
func TestRunFollowsCertificateRenewal(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	groupsFile := filepath.Join(dir, "groups.yml")
	writeFile(t, groupsFile, `groups: {svc: {hosts: [svc.example]}}`)
	first, second := testpki.New(t), testpki.New(t)
	certPath, keyPath := first.WriteFiles(t, dir)
	tunnelAddr, httpsAddr := testnet.Addr(t, testnet.Tunnel), testnet.Addr(t, testnet.TCP)
	startRun(t,
		"-n", "localhost", "-k", keyPath, "-c", certPath, "-g", groupsFile,
		"-a", tunnelAddr, "-s", testnet.Addr(t, testnet.TCP), "--https-address", httpsAddr,
	)
	ctx := t.Context()

	served := func() map[string]string {
		t.Helper()
		conf := &tls.Config{InsecureSkipVerify: true}
		qctx, qcancel := context.WithTimeout(ctx, 5*time.Second)
		defer qcancel()
		q, err := quic.DialAddr(qctx, tunnelAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{protocol.ALPN}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer q.CloseWithError(0, "")
		return map[string]string{
			"quic":  q.ConnectionState().TLS.PeerCertificates[0].SerialNumber.String(),
			"data":  servedOver(t, tunnelAddr, conf),
			"https": servedOver(t, httpsAddr, conf),
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := net.DialTimeout("tcp", httpsAddr, time.Second); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the HTTPS frontend did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for where, got := range served() {
		if got != serial(first) {
			t.Fatalf("%s serves %s, want %s", where, got, serial(first))
		}
	}

	writePair(t, certPath, keyPath, second.CertPEM, second.KeyPEM, time.Now().Add(time.Minute))
	time.Sleep(keyPairCheck)
	for where, got := range served() {
		if got != serial(second) {
			t.Fatalf("%s serves %s after the renewal, want %s", where, got, serial(second))
		}
	}
}
