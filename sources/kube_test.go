package sources

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/internal/kubetest"
)

// The names deploy/rbac.yaml grants access to.
const (
	groupsConfigMap = "reverst-groups"
	groupsKey       = "groups.yml"
	tokenSecret     = "reverst-token"
	tokenKey        = "token"
)

var cluster kubetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	cluster.Stop()
	os.Exit(code)
}

// deployRBAC reads the Role and RoleBinding of deploy/rbac.yaml.
func deployRBAC(t *testing.T) (*rbacv1.Role, *rbacv1.RoleBinding) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "deploy", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var role *rbacv1.Role
	var binding *rbacv1.RoleBinding
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "Role":
			role = &rbacv1.Role{}
			err = yaml.UnmarshalStrict(doc, role)
		case "RoleBinding":
			binding = &rbacv1.RoleBinding{}
			err = yaml.UnmarshalStrict(doc, binding)
		}
		if err != nil {
			t.Fatalf("deploy/rbac.yaml %s: %v", meta.Kind, err)
		}
	}
	if role == nil || binding == nil {
		t.Fatal("deploy/rbac.yaml lacks a Role or a RoleBinding")
	}
	if binding.RoleRef.Kind != "Role" || binding.RoleRef.Name != role.Name {
		t.Fatalf("deploy/rbac.yaml: RoleBinding refers to %s %q, not the Role %q", binding.RoleRef.Kind, binding.RoleRef.Name, role.Name)
	}
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" || binding.Subjects[0].Name != "reverst" {
		t.Fatalf("deploy/rbac.yaml: RoleBinding subjects %+v, want the ServiceAccount reverst", binding.Subjects)
	}
	return role, binding
}

// rbacNamespace makes a namespace holding deploy/rbac.yaml's Role, bound
// to the unprivileged test user instead of the ServiceAccount, and returns
// it with an admin client.
func rbacNamespace(t *testing.T) (string, *kubetest.Cluster, kubernetes.Interface) {
	t.Helper()
	c := cluster.Get(t)
	admin := kubernetes.NewForConfigOrDie(c.Admin)
	ctx := context.Background()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	ns := "t-" + hex.EncodeToString(b)
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	role, binding := deployRBAC(t)
	role.Namespace, binding.Namespace = ns, ns
	binding.Subjects = []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: kubetest.UserName}}
	if _, err := admin.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().RoleBindings(ns).Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The authorizer learns of the binding through its own watch: wait
	// until the user is allowed (NotFound is an allowed answer).
	user := kubernetes.NewForConfigOrDie(c.User)
	eventually(t, "RBAC binding in force", func() bool {
		_, err := user.CoreV1().ConfigMaps(ns).Get(ctx, groupsConfigMap, metav1.GetOptions{})
		return err == nil || apierrors.IsNotFound(err)
	})
	return ns, c, admin
}

func groupsMap(ns string, data map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: groupsConfigMap, Namespace: ns}, Data: data}
}

func TestConfigMapSource(t *testing.T) {
	ns, c, admin := rbacNamespace(t)
	ctx := context.Background()
	cms := admin.CoreV1().ConfigMaps(ns)
	if _, err := cms.Create(ctx, groupsMap(ns, map[string]string{groupsKey: string(definition("a"))}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	update := func(data map[string]string) {
		t.Helper()
		if _, err := cms.Update(ctx, groupsMap(ns, data), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	reg := prometheus.NewRegistry()
	src, err := Open("k8s://configmap/"+ns+"/"+groupsConfigMap+"/"+groupsKey, Options{Kube: c.User, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := src.Load(ctx)
	if err != nil {
		t.Fatalf("Load as the unprivileged user: %v", err)
	}
	if !slices.Equal(cfg.Names(), []string{"a"}) {
		t.Fatalf("Load: %v", cfg.Names())
	}
	a := newApplied()
	watch(t, src, a)

	update(map[string]string{groupsKey: string(definition("a", "b"))})
	a.waitLast(t, "a", "b")

	failures := reloads(t, reg, src.String(), "failure")
	failed := func(what, want string) {
		t.Helper()
		eventually(t, what+" reported", func() bool {
			err := src.Status()
			return err != nil && strings.Contains(err.Error(), want) && reloads(t, reg, src.String(), "failure") > failures
		})
		failures = reloads(t, reg, src.String(), "failure")
	}
	update(map[string]string{groupsKey: string(broken)})
	failed("invalid YAML", `group "x": hosts`)
	update(map[string]string{groupsKey: "groups: [unclosed"})
	failed("unparsable YAML", "yaml")
	update(map[string]string{"other.yml": string(definition("z"))})
	failed("missing key", `key "groups.yml" missing`)

	update(map[string]string{groupsKey: string(definition("c"))})
	a.waitLast(t, "c")
	eventually(t, "healthy", func() bool { return src.Status() == nil })

	if err := cms.Delete(ctx, groupsConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	failed("deletion", "deleted")

	if _, err := cms.Create(ctx, groupsMap(ns, map[string]string{groupsKey: string(definition("d"))}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "d")
	if calls, want := a.snapshot(), [][]string{{"a", "b"}, {"c"}, {"d"}}; !slices.EqualFunc(calls, want, slices.Equal) {
		t.Errorf("applied %v, want %v", calls, want)
	}
	// apply returns before the success is counted.
	eventually(t, "4 successes (load and 3 changes)", func() bool { return reloads(t, reg, src.String(), "success") == 4 })
}

func TestConfigMapMissingAtStart(t *testing.T) {
	ns, c, admin := rbacNamespace(t)
	src, err := Open("k8s://configmap/"+ns+"/"+groupsConfigMap+"/"+groupsKey, Options{Kube: c.User})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); !apierrors.IsNotFound(err) {
		t.Fatalf("Load of a missing ConfigMap: %v, want NotFound", err)
	}
	a := newApplied()
	watch(t, src, a)
	eventually(t, "missing ConfigMap reported by Watch", func() bool {
		err := src.Status()
		return err != nil && errors.Is(err, errNotFound)
	})
	if _, err := admin.CoreV1().ConfigMaps(ns).Create(context.Background(),
		groupsMap(ns, map[string]string{groupsKey: string(definition("a"))}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "a")
	eventually(t, "healthy", func() bool { return src.Status() == nil })
}

// An API server that takes the request and never answers fails Load
// after its timeout instead of holding start-up.
func TestConfigMapLoadOfSilentAPIServer(t *testing.T) {
	release := make(chan struct{})
	silent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer silent.Close()
	defer close(release)

	src, err := Open("k8s://configmap/ns/"+groupsConfigMap+"/"+groupsKey, Options{Kube: &rest.Config{Host: silent.URL}})
	if err != nil {
		t.Fatal(err)
	}
	src.(*configMap).getTimeout = 300 * time.Millisecond
	start := time.Now()
	_, err = src.Load(context.Background())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Load: %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Load returned after %v", d)
	}
	if src.Status() == nil {
		t.Error("Status is nil after the failed Load")
	}
}

// The rules grant the one ConfigMap and nothing else: the same user is
// refused another one in the same namespace.
func TestConfigMapRBACIsTight(t *testing.T) {
	ns, c, admin := rbacNamespace(t)
	other := groupsMap(ns, map[string]string{groupsKey: string(definition("a"))})
	other.Name = "other"
	if _, err := admin.CoreV1().ConfigMaps(ns).Create(context.Background(), other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	src, err := Open("k8s://configmap/"+ns+"/other/"+groupsKey, Options{Kube: c.User})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); !apierrors.IsForbidden(err) {
		t.Fatalf("Load of another ConfigMap: %v, want Forbidden", err)
	}
	a := newApplied()
	watch(t, src, a)
	eventually(t, "forbidden watch reported", func() bool {
		err := src.Status()
		return err != nil && strings.Contains(err.Error(), "forbidden")
	})
	if calls := a.snapshot(); len(calls) != 0 {
		t.Fatalf("applied %v from a forbidden ConfigMap", calls)
	}
}

func TestSecretsFollowRotation(t *testing.T) {
	ns, c, admin := rbacNamespace(t)
	ctx := context.Background()
	secrets := admin.CoreV1().Secrets(ns)
	secret := func(token string) *corev1.Secret {
		return &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: tokenSecret, Namespace: ns},
			Data:       map[string][]byte{tokenKey: []byte(token)},
		}
	}
	if _, err := secrets.Create(ctx, secret("one"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	s := &Secrets{Kube: c.User}
	t.Cleanup(func() { _ = s.Close() })
	path := "k8s://secret/" + ns + "/" + tokenSecret + "/" + tokenKey
	read := func() string {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		v, err := s.Read(ctx, path)
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		return string(v)
	}
	if got := read(); got != "one" {
		t.Fatalf("Read = %q, want one", got)
	}
	if _, err := secrets.Update(ctx, secret("two"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "rotated token", func() bool { return read() == "two" })

	if _, err := s.Read(ctx, "k8s://secret/"+ns+"/"+tokenSecret+"/nokey"); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Read of a missing key: %v", err)
	}
	if err := secrets.Delete(ctx, tokenSecret, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deletion seen", func() bool {
		_, err := s.Read(ctx, path)
		return errors.Is(err, errNotFound)
	})

	// Another Secret is not granted: Read says so rather than hang.
	otherCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.Read(otherCtx, "k8s://secret/"+ns+"/other/"+tokenKey); err == nil || !strings.Contains(err.Error(), "forbidden") {
		t.Errorf("Read of a Secret the rules do not grant: %v, want forbidden", err)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(ctx, path); !errors.Is(err, ErrClosed) {
		t.Errorf("Read after Close: %v, want ErrClosed", err)
	}
}

func TestSecretsFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	writeFile(t, path, []byte("s3cret\n"))
	var s Secrets
	for _, p := range []string{path, "file://" + path} {
		v, err := s.Read(context.Background(), p)
		if err != nil || string(v) != "s3cret\n" {
			t.Errorf("Read(%q) = %q, %v", p, v, err)
		}
	}
	if _, err := s.Read(context.Background(), filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Read of a missing file: %v", err)
	}
	if _, err := s.Read(context.Background(), "k8s://secret/ns/name"); err == nil {
		t.Error("Read of a malformed k8s path succeeded")
	}
}

// The check for a ConfigMap missing at start waits for the informer's
// initial list, polled every 100 ms: made after a deletion was reported, it
// must not report it again as "not found" (a second failure, and a Status
// that no longer says what happened).
func TestConfigMapDeletedBeforeInitialCheck(t *testing.T) {
	ns, c, admin := rbacNamespace(t)
	ctx := context.Background()
	cms := admin.CoreV1().ConfigMaps(ns)
	if _, err := cms.Create(ctx, groupsMap(ns, map[string]string{groupsKey: string(definition("a"))}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	reached, release, checked := make(chan struct{}), make(chan struct{}), make(chan struct{})
	reg := prometheus.NewRegistry()
	src, err := Open("k8s://configmap/"+ns+"/"+groupsConfigMap+"/"+groupsKey, Options{Kube: c.User, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	src.(*configMap).initialCheck = func(check func()) {
		close(reached)
		<-release
		check()
		close(checked)
	}
	if _, err := src.Load(ctx); err != nil {
		t.Fatal(err)
	}
	a := newApplied()
	watch(t, src, a)
	select {
	case <-reached:
	case <-time.After(waitFor):
		t.Fatal("the initial list did not sync")
	}
	failures := reloads(t, reg, src.String(), "failure")
	if err := cms.Delete(ctx, groupsConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deletion reported", func() bool {
		err := src.Status()
		return err != nil && strings.Contains(err.Error(), "deleted")
	})
	close(release)
	<-checked
	// Events are handled in order: once d is applied, whatever the late
	// check sent has been handled.
	if _, err := cms.Create(ctx, groupsMap(ns, map[string]string{groupsKey: string(definition("d"))}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "d")
	if n := reloads(t, reg, src.String(), "failure") - failures; n != 1 {
		t.Errorf("%v failures counted for one deletion, want 1", n)
	}
}
