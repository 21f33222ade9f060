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
	// loaded, when set, is called with every pair read, the first included.
	loaded func(*tls.Certificate)
	now    func() time.Time // tests move time; nil is time.Now

	mu      sync.Mutex
	cert    *tls.Certificate
	stamps  [2]fileStamp // of the files cert was read from
	bad     string       // the files and error last reported
	checked time.Time
}

// fileStamp tells one version of a file from another: a renewal rewrites
// the file or, in a Secret volume, swaps the symbolic link it sits behind.
type fileStamp struct {
	mod  time.Time
	size int64
}

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
	k.mu.Lock()
	defer k.mu.Unlock()
	if now := k.now(); now.Sub(k.checked) >= keyPairCheck {
		k.checked = now
		k.refresh()
	}
	return k.cert, nil
}

// refresh reads the files again if they changed since the last read.
func (k *keyPair) refresh() {
	stamps, err := k.stat()
	if err == nil && stamps == k.stamps {
		return
	}
	var cert *tls.Certificate
	if err == nil {
		cert, err = k.read()
	}
	if err != nil {
		// Once for each version of the files, not at every check.
		if report := fmt.Sprint(stamps, err); report != k.bad {
			k.bad = report
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
		s[i] = fileStamp{fi.ModTime(), fi.Size()}
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
	k.cert, k.stamps, k.bad = cert, stamps, ""
	if k.loaded != nil {
		k.loaded(cert)
	}
}
