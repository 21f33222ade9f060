package sources

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// DefaultSecretWait bounds how long Read waits for a Secret's first list
// when its ctx has no deadline.
const DefaultSecretWait = 10 * time.Second

// ErrClosed is returned by Secrets.Read after Close.
var ErrClosed = errors.New("sources: secrets reader closed")

// Secrets reads secret values named by a path: a file path (or file://
// URL), read on every call, or k8s://secret/NAMESPACE/NAME/KEY, served from
// a watch cache of that one Secret, so that each Read is cheap and follows
// rotation. The first Read of a Secret starts its informer and waits for
// the initial list. The zero value is ready to use (in-cluster
// configuration, else KUBECONFIG); Close stops the informers.
type Secrets struct {
	// Kube is the API server configuration; nil means in-cluster, else
	// KUBECONFIG or ~/.kube/config.
	Kube *rest.Config
	// Logger receives informer failures; nil discards them.
	Logger *slog.Logger
	// MaxBytes caps a file's size (DefaultMaxBytes when zero).
	MaxBytes int64

	mu      sync.Mutex
	client  kubernetes.Interface
	ctx     context.Context // lives until Close
	cancel  context.CancelFunc
	closed  bool
	watches map[kubeRef]*secretWatch // keyed without the key
}

// secretWatch is the informer of one Secret.
type secretWatch struct {
	inf        cache.SharedIndexInformer
	synced     chan struct{} // closed after the first list
	failed     chan struct{} // closed at the first list/watch failure
	failedOnce sync.Once

	mu      sync.Mutex
	lastErr error // last list/watch failure, cleared by the next success
}

func (w *secretWatch) err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastErr
}

// Read returns the value at path. Its signature is the hook the auth
// package calls at every registration. The value is returned as stored
// (no trimming).
func (s *Secrets) Read(ctx context.Context, path string) ([]byte, error) {
	if !strings.HasPrefix(path, "k8s://") {
		if p, ok := strings.CutPrefix(path, "file://"); ok {
			path = p
		}
		limit := s.MaxBytes
		if limit <= 0 {
			limit = DefaultMaxBytes
		}
		return readFile(path, limit)
	}
	ref, err := parseKubeRef(path, "secret")
	if err != nil {
		return nil, err
	}
	w, err := s.watch(ref)
	if err != nil {
		return nil, err
	}
	select {
	case <-w.synced:
	default:
		// A failing informer answers at once rather than making every
		// registration wait.
		if err := w.err(); err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, DefaultSecretWait)
			defer cancel()
		}
		select {
		case <-w.synced:
		case <-w.failed:
			if err := w.err(); err != nil {
				return nil, fmt.Errorf("%s: %w", ref, err)
			}
			// Failed, then listed: fall through to the store.
		case <-ctx.Done():
			if err := w.err(); err != nil {
				return nil, fmt.Errorf("%s: %w", ref, err)
			}
			return nil, fmt.Errorf("%s: waiting for the Secret: %w", ref, ctx.Err())
		}
	}
	obj, exists, err := w.inf.GetStore().GetByKey(ref.namespace + "/" + ref.name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	if !exists {
		if err := w.err(); err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		return nil, fmt.Errorf("%s: Secret %s/%s: %w", ref, ref.namespace, ref.name, errNotFound)
	}
	secret, ok := obj.(*corev1.Secret)
	if !ok {
		return nil, fmt.Errorf("%s: unexpected object %T", ref, obj)
	}
	v, ok := secret.Data[ref.key]
	if !ok {
		return nil, fmt.Errorf("%s: key %q missing from Secret %s/%s", ref, ref.key, ref.namespace, ref.name)
	}
	return append([]byte(nil), v...), nil
}

// watch returns the informer of ref's Secret, starting it if needed.
func (s *Secrets) watch(ref kubeRef) (*secretWatch, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	id := kubeRef{kind: ref.kind, namespace: ref.namespace, name: ref.name}
	if w, ok := s.watches[id]; ok {
		return w, nil
	}
	if s.client == nil {
		cl, err := kubeClient(s.Kube)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		s.client = cl
	}
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.watches = map[kubeRef]*secretWatch{}
	}
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("secret", ref.namespace+"/"+ref.name)

	w := &secretWatch{
		inf:    coreinformers.NewFilteredSecretInformer(s.client, ref.namespace, 0, cache.Indexers{}, ref.selector),
		synced: make(chan struct{}),
		failed: make(chan struct{}),
	}
	_ = w.inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, _ *cache.Reflector, err error) {
		if ctx.Err() != nil || watchClosed(err) {
			return
		}
		w.mu.Lock()
		w.lastErr = err
		w.mu.Unlock()
		w.failedOnce.Do(func() { close(w.failed) })
		log.Warn("watching Secret failed, retrying", "error", err)
	})
	clearErr := func(any) {
		w.mu.Lock()
		w.lastErr = nil
		w.mu.Unlock()
	}
	_, _ = w.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    clearErr,
		UpdateFunc: func(_, obj any) { clearErr(obj) },
		DeleteFunc: clearErr,
	})
	s.watches[id] = w
	go w.inf.RunWithContext(s.ctx)
	go func() {
		if cache.WaitForCacheSync(s.ctx.Done(), w.inf.HasSynced) {
			// A successful list also means the earlier failures are over.
			clearErr(nil)
			close(w.synced)
		}
	}()
	return w, nil
}

// Close stops the informers; later k8s reads fail with ErrClosed.
func (s *Secrets) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.cancel != nil {
		s.cancel()
	}
	return nil
}
