package app

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// keyPairCheck is how often, at most, the files of a keyPair are looked
// at: one stat of each on a handshake, once in that time.
const keyPairCheck = 10 * time.Second

// keyPair is a certificate and its private key read from files, and read
// again once they change: cert-manager and the kubelet (a Secret volume)
// or certbot renew them in place, and neither tunnel clients nor visitors
// may meet a certificate that expired while the server kept running. The
// files are looked at on handshakes, at most every keyPairCheck; a pair
// that does not load (a certificate written before its key) is reported
// once and the last good pair kept.
type keyPair struct {
	certPath, keyPath string
	flags             string // names the pair in messages: its flags
	log               *slog.Logger
	// serverName, when set, is the name a new certificate is expected to
	// cover: one that does not is warned about.
	serverName string
	now        func() time.Time // tests move time; nil is time.Now

	mu      sync.Mutex
	cert    *tls.Certificate
	stamps  [2]fileStamp // of the files cert was read from
	bad     [2]fileStamp // of the files last reported not to load
	badErr  string       // the error reported for them; "" when none
	checked time.Time
}

// fileStamp tells one version of a file from another: a renewal rewrites
// the file or, in a Secret volume, swaps the symbolic link it sits behind.
type fileStamp struct {
	mod  time.Time
	size int64
	// file tells apart files whose time and size match: two versions
	// of a pair with the same key type written within a tick of the
	// filesystem's clock (a few ms on Linux), which a link re-pointed
	// from one to the other would otherwise not show.
	file os.FileInfo
}

func (s fileStamp) same(o fileStamp) bool {
	if (s.file == nil) != (o.file == nil) || (s.file != nil && !os.SameFile(s.file, o.file)) {
		return false
	}
	return s.mod.Equal(o.mod) && s.size == o.size
}

func sameFiles(a, b [2]fileStamp) bool { return a[0].same(b[0]) && a[1].same(b[1]) }

// load reads the pair for the first time; an error stops the server.
func (k *keyPair) load() (*tls.Certificate, error) {
	if k.now == nil {
		k.now = time.Now
	}
	stamps, err := k.stat()
	var cert *tls.Certificate
	if err == nil {
		cert, err = k.read()
	}
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", k.flags, err)
	}
	k.checked = k.now()
	k.set(cert, stamps)
	return cert, nil
}

// GetCertificate is the tls.Config hook: the current pair, read again
// first if its files changed.
func (k *keyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return k.get(), nil
}

// NotAfter is when the current pair expires, in Unix seconds, for a
// gauge: read again first if its files changed, so that a renewal shows
// on a server that has no handshake to make.
func (k *keyPair) NotAfter() float64 {
	return float64(k.get().Leaf.NotAfter.Unix())
}

func (k *keyPair) get() *tls.Certificate {
	k.mu.Lock()
	defer k.mu.Unlock()
	if now := k.now(); now.Sub(k.checked) >= keyPairCheck {
		k.checked = now
		k.refresh()
	}
	return k.cert
}

// refresh reads the files again if they changed since the last read.
func (k *keyPair) refresh() {
	stamps, err := k.stat()
	if err == nil && sameFiles(stamps, k.stamps) {
		return
	}
	var cert *tls.Certificate
	if err == nil {
		cert, err = k.read()
	}
	if err != nil {
		// Once for each version of the files, not at every check.
		if !sameFiles(stamps, k.bad) || err.Error() != k.badErr {
			k.bad, k.badErr = stamps, err.Error()
			k.log.Warn("certificate files changed but do not load; keeping the previous pair", "flags", k.flags, "error", err)
		}
		return
	}
	k.set(cert, stamps)
	k.log.Info("certificate reloaded", "path", k.certPath, "not_after", cert.Leaf.NotAfter)
}

func (k *keyPair) stat() ([2]fileStamp, error) {
	var s [2]fileStamp
	for i, path := range []string{k.certPath, k.keyPath} {
		fi, err := os.Stat(path)
		if err != nil {
			return s, err
		}
		s[i] = fileStamp{fi.ModTime(), fi.Size(), fi}
	}
	return s, nil
}

func (k *keyPair) read() (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(k.certPath, k.keyPath)
	if err != nil {
		return nil, err
	}
	// LoadX509KeyPair has parsed the leaf already.
	if k.serverName != "" {
		if err := cert.Leaf.VerifyHostname(k.serverName); err != nil {
			k.log.Warn("the certificate does not cover --server-name; clients verifying it will fail", "server_name", k.serverName, "error", err)
		}
	}
	return &cert, nil
}

func (k *keyPair) set(cert *tls.Certificate, stamps [2]fileStamp) {
	k.cert, k.stamps, k.badErr = cert, stamps, ""
}
