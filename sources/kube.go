package sources

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/reverst-dev/reverst/groups"
)

// kubeRef names one key of one ConfigMap or Secret.
type kubeRef struct {
	kind, namespace, name, key string
}

func (r kubeRef) String() string {
	return "k8s://" + r.kind + "/" + r.namespace + "/" + r.name + "/" + r.key
}

// parseKubeRef parses k8s://KIND/NAMESPACE/NAME/KEY for the given kind.
func parseKubeRef(location, kind string) (kubeRef, error) {
	rest, ok := strings.CutPrefix(location, "k8s://")
	parts := strings.Split(rest, "/")
	if !ok || len(parts) != 4 || parts[0] != kind || parts[1] == "" || parts[2] == "" || parts[3] == "" {
		return kubeRef{}, fmt.Errorf("%q: want k8s://%s/NAMESPACE/NAME/KEY", location, kind)
	}
	return kubeRef{kind: kind, namespace: parts[1], name: parts[2], key: parts[3]}, nil
}

// selector restricts a list or watch to the one named object. RBAC rules
// limited by resourceNames allow list and watch only with this selector.
func (r kubeRef) selector(o *metav1.ListOptions) {
	o.FieldSelector = fields.OneTermEqualSelector("metadata.name", r.name).String()
}

// kubeClient builds a client from cfg, or when cfg is nil from the
// in-cluster configuration, else KUBECONFIG or ~/.kube/config.
func kubeClient(cfg *rest.Config) (kubernetes.Interface, error) {
	if cfg != nil {
		cfg = rest.CopyConfig(cfg)
	} else {
		var err error
		cfg, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			cfg, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
				clientcmd.NewDefaultClientConfigLoadingRules(), &clientcmd.ConfigOverrides{}).ClientConfig()
		}
		if err != nil {
			return nil, fmt.Errorf("kubernetes client configuration: %w", err)
		}
	}
	if cfg.UserAgent == "" {
		cfg.UserAgent = "reverst"
	}
	return kubernetes.NewForConfig(cfg)
}

// configMap is a definition kept under one key of one ConfigMap. Watch
// runs an informer restricted to that object, so it needs only get, list
// and watch on it.
type configMap struct {
	ref  kubeRef
	opts Options
	r    *reloader

	mu     sync.Mutex
	client kubernetes.Interface

	// initialCheck, when set, runs the check for a ConfigMap missing from
	// the initial list; tests delay it.
	initialCheck func(check func())
	// getTimeout bounds Load's GET; zero means requestTimeout.
	getTimeout time.Duration
}

func newConfigMap(ref kubeRef, opts Options, m *metrics) *configMap {
	return &configMap{ref: ref, opts: opts, r: newReloader(ref.String(), opts.Logger, m)}
}

func (c *configMap) String() string { return c.r.name }

func (c *configMap) Status() error { return c.r.Status() }

func (c *configMap) kube() (kubernetes.Interface, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.client == nil {
		cl, err := kubeClient(c.opts.Kube)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c, err)
		}
		c.client = cl
	}
	return c.client, nil
}

// Load GETs the ConfigMap and validates the key's value.
func (c *configMap) Load(ctx context.Context) (*groups.Config, error) {
	data, err := c.get(ctx)
	if err != nil {
		c.r.fail(err)
		return nil, err
	}
	return c.r.load(data)
}

func (c *configMap) get(ctx context.Context) ([]byte, error) {
	cl, err := c.kube()
	if err != nil {
		return nil, err
	}
	// The client has no timeout of its own (one would also cut the
	// informer's watches): an API server that takes the connection and
	// never answers would hold start-up until SIGTERM.
	timeout := c.getTimeout
	if timeout == 0 {
		timeout = requestTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cm, err := cl.CoreV1().ConfigMaps(c.ref.namespace).Get(ctx, c.ref.name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", c, err)
	}
	return c.value(cm)
}

// value returns the key's value, which may sit in data or binaryData.
func (c *configMap) value(cm *corev1.ConfigMap) ([]byte, error) {
	if v, ok := cm.Data[c.ref.key]; ok {
		return []byte(v), nil
	}
	if v, ok := cm.BinaryData[c.ref.key]; ok {
		return v, nil
	}
	return nil, fmt.Errorf("%s: key %q missing from ConfigMap %s/%s", c, c.ref.key, c.ref.namespace, c.ref.name)
}

// kubeEvent is what the informer tells Watch: the key's value, or why there
// is none.
type kubeEvent struct {
	data []byte
	err  error
}

// Watch runs the informer until ctx ends. A missing key or a deleted
// ConfigMap keeps the last good definition and sets Status; list and watch
// failures (API server down, RBAC) are retried by the informer with
// backoff and reported the same way.
func (c *configMap) Watch(ctx context.Context, apply func(*groups.Config) error) error {
	var cl kubernetes.Interface
	retry := retryBackoff(time.Second, c.opts.MaxBackoff)
	for {
		var err error
		if cl, err = c.kube(); err == nil {
			break
		}
		c.r.fail(err)
		if err := sleep(ctx, retry.NextBackOff()); err != nil {
			return err
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan kubeEvent)
	send := func(ev kubeEvent) {
		select {
		case events <- ev:
		case <-ctx.Done():
		}
	}
	inf := coreinformers.NewFilteredConfigMapInformer(cl, c.ref.namespace, 0, cache.Indexers{}, c.ref.selector)
	_ = inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, _ *cache.Reflector, err error) {
		if ctx.Err() == nil && !watchClosed(err) {
			send(kubeEvent{err: fmt.Errorf("%s: %w: %w", c, errListWatch, err)})
		}
	})
	onObject := func(obj any) {
		cm, ok := obj.(*corev1.ConfigMap)
		if !ok || cm.Name != c.ref.name {
			return
		}
		data, err := c.value(cm)
		send(kubeEvent{data: data, err: err})
	}
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    onObject,
		UpdateFunc: func(_, obj any) { onObject(obj) },
		DeleteFunc: func(any) {
			send(kubeEvent{err: fmt.Errorf("%s: ConfigMap %s/%s deleted", c, c.ref.namespace, c.ref.name)})
		},
	})
	if err != nil {
		return fmt.Errorf("%s: %w", c, err)
	}
	go inf.RunWithContext(ctx)
	// The informer says nothing about an object that does not exist, so
	// tell Watch once the initial list is in.
	go func() {
		if !cache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
			return
		}
		check := func() {
			if _, exists, _ := inf.GetStore().GetByKey(c.ref.namespace + "/" + c.ref.name); !exists {
				send(kubeEvent{err: fmt.Errorf("%s: ConfigMap %s/%s: %w", c, c.ref.namespace, c.ref.name, errNotFound)})
			}
		}
		if c.initialCheck != nil {
			c.initialCheck(check)
		} else {
			check()
		}
	}()

	// seen is set by the first event about the object. The initial list's
	// are handled before HasSynced holds, so the check above can only
	// find the object missing without an event before it if it never
	// existed; made late (WaitForCacheSync polls every 100 ms), it finds a
	// deletion already reported, which it must not report again as "not
	// found".
	seen := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev := <-events:
			if errors.Is(ev.err, errNotFound) {
				// It may have been created since.
				if _, exists, _ := inf.GetStore().GetByKey(c.ref.namespace + "/" + c.ref.name); seen || exists {
					continue
				}
			} else if ev.data != nil || !errors.Is(ev.err, errListWatch) {
				seen = true
			}
			if ev.err != nil {
				c.r.fail(ev.err)
				continue
			}
			_ = c.r.offer(ev.data, apply) // logged and counted by offer
		}
	}
}

var errListWatch = errors.New("list/watch")

var errNotFound = errors.New("not found")

// watchClosed reports whether a list/watch error is the ordinary end of a
// watch, after which the informer lists or watches again by itself; other
// errors (refused, unreachable) are failures worth reporting.
func watchClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		apierrors.IsResourceExpired(err) || apierrors.IsGone(err)
}
