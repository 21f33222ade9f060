// Package deploy_test validates the Kubernetes manifests of this directory
// against a real kube-apiserver: it builds them the way kustomize would
// (this kustomization only uses namespace and resources, and the test
// refuses anything else), applies every object with server-side apply and
// strict field validation, checks that the pieces refer to each other
// correctly, and that the ServiceAccount may read what the server needs.
package deploy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/internal/kubetest"
)

var cluster kubetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	cluster.Stop()
	os.Exit(code)
}

// kustomization is the subset of kustomize's file this directory uses.
// Decoding is strict: a field added to kustomization.yaml that this test
// does not apply makes it fail rather than validate something else.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
}

// build returns the objects `kustomize build` would: every document of
// every resource file, in the kustomization's namespace.
func build(t *testing.T) (kustomization, []*unstructured.Unstructured) {
	t.Helper()
	data, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.Kind != "Kustomization" || k.Namespace == "" || len(k.Resources) == 0 {
		t.Fatalf("kustomization.yaml: want kind Kustomization with a namespace and resources, got %+v", k)
	}
	var objs []*unstructured.Unstructured
	for _, file := range k.Resources {
		data, err := os.ReadFile(filepath.Clean(file))
		if err != nil {
			t.Fatalf("resource %s: %v", file, err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var obj map[string]any
			if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			if obj == nil {
				continue
			}
			u := &unstructured.Unstructured{Object: obj}
			// kustomize's namespace transformer: namespaced objects and the
			// ServiceAccount subjects of role bindings move to the
			// kustomization's namespace.
			if u.GetKind() != "Namespace" && !strings.HasPrefix(u.GetKind(), "Cluster") {
				u.SetNamespace(k.Namespace)
			}
			if subjects, ok, _ := unstructured.NestedSlice(u.Object, "subjects"); ok {
				for _, s := range subjects {
					if m, ok := s.(map[string]any); ok && m["kind"] == "ServiceAccount" {
						m["namespace"] = k.Namespace
					}
				}
				if err := unstructured.SetNestedSlice(u.Object, subjects, "subjects"); err != nil {
					t.Fatal(err)
				}
			}
			objs = append(objs, u)
		}
	}
	return k, objs
}

func TestManifestsApply(t *testing.T) {
	c := cluster.Get(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	k, objs := build(t)
	cs := kubernetes.NewForConfigOrDie(c.Admin)
	dyn := dynamic.NewForConfigOrDie(c.Admin)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(c.Admin)))

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: k.Namespace}}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	for _, obj := range objs {
		gvk := obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s %s: %v", gvk, obj.GetName(), err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
		}
		data, err := obj.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		_, err = ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
			FieldManager:    "reverst-deploy-test",
			Force:           ptr(true),
			FieldValidation: metav1.FieldValidationStrict,
		})
		if err != nil {
			t.Fatalf("applying %s %s/%s: %v", gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
		}
		t.Logf("applied %s %s/%s", gvk.Kind, obj.GetNamespace(), obj.GetName())
	}

	deploy := get[appsv1.Deployment](t, objs, "Deployment", "reverst")
	cm := get[corev1.ConfigMap](t, objs, "ConfigMap", "reverst-groups")
	if len(deploy.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(deploy.Spec.Template.Spec.Containers))
	}
	ctr := deploy.Spec.Template.Spec.Containers[0]
	env := map[string]corev1.EnvVar{}
	for _, e := range ctr.Env {
		env[e.Name] = e
	}

	t.Run("groups come from the ConfigMap through the API", func(t *testing.T) {
		if f := env["NAMESPACE"].ValueFrom; f == nil || f.FieldRef == nil || f.FieldRef.FieldPath != "metadata.namespace" {
			t.Fatalf("NAMESPACE must come from the downward API (metadata.namespace), got %+v", env["NAMESPACE"])
		}
		want := "k8s://configmap/$(NAMESPACE)/" + cm.Name + "/groups.yml"
		if got := env["REVERST_TUNNEL_GROUPS"].Value; got != want {
			t.Fatalf("REVERST_TUNNEL_GROUPS = %q, want %q", got, want)
		}
		def, ok := cm.Data["groups.yml"]
		if !ok {
			t.Fatalf("ConfigMap %s has no key groups.yml", cm.Name)
		}
		parsed, err := groups.Parse([]byte(def))
		if err != nil {
			t.Fatalf("ConfigMap %s groups.yml: %v", cm.Name, err)
		}
		for _, name := range parsed.Names() {
			b := parsed.Groups[name].Authentication.Bearer
			if b == nil {
				continue
			}
			for _, p := range []string{b.TokenPath, b.HashedTokenPath} {
				if strings.HasPrefix(p, "k8s://secret/") && !strings.HasPrefix(p, "k8s://secret/"+k.Namespace+"/reverst-token/") {
					t.Errorf("group %q reads %s: the server may only read Secret reverst-token in %s", name, p, k.Namespace)
				}
			}
		}
	})

	t.Run("probes, ports and services agree", func(t *testing.T) {
		ports := map[string]corev1.ContainerPort{}
		for _, p := range ctr.Ports {
			ports[p.Name] = p
		}
		for name, addrEnv := range map[string]string{
			"tunnel":     "REVERST_TUNNEL_ADDRESS",
			"http":       "REVERST_HTTP_ADDRESS",
			"management": "REVERST_MANAGEMENT_ADDRESS",
		} {
			_, port, err := net.SplitHostPort(env[addrEnv].Value)
			if err != nil {
				t.Fatalf("%s: %v", addrEnv, err)
			}
			if got := fmt.Sprint(ports[name].ContainerPort); got != port {
				t.Errorf("container port %q is %s, but %s listens on %s", name, got, addrEnv, port)
			}
		}
		if ports["tunnel"].Protocol != corev1.ProtocolUDP {
			t.Errorf("the tunnel port must be UDP (QUIC), got %q", ports["tunnel"].Protocol)
		}
		for probe, path := range map[*corev1.Probe]string{ctr.ReadinessProbe: "/readyz", ctr.LivenessProbe: "/healthz"} {
			if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path || probe.HTTPGet.Port.String() != "management" {
				t.Errorf("want an HTTP probe on %s of the management port, got %+v", path, probe)
			}
		}
		sel := deploy.Spec.Template.Labels
		for _, obj := range objs {
			if obj.GetKind() != "Service" {
				continue
			}
			var svc corev1.Service
			convert(t, obj, &svc)
			for k, v := range svc.Spec.Selector {
				if sel[k] != v {
					t.Errorf("Service %s selects %s=%s, which the pods do not carry", svc.Name, k, v)
				}
			}
			for _, p := range svc.Spec.Ports {
				cp, ok := ports[p.TargetPort.String()]
				if !ok || cp.Protocol != p.Protocol {
					t.Errorf("Service %s port %s targets %s/%s, which the container does not expose", svc.Name, p.Name, p.TargetPort.String(), p.Protocol)
				}
			}
		}
	})

	t.Run("locked-down pod", func(t *testing.T) {
		pod := deploy.Spec.Template.Spec
		if pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot {
			t.Error("pod securityContext.runAsNonRoot must be true")
		}
		sc := ctr.SecurityContext
		switch {
		case sc == nil:
			t.Fatal("container has no securityContext")
		case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
			t.Error("readOnlyRootFilesystem must be true")
		case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
			t.Error("allowPrivilegeEscalation must be false")
		case sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL":
			t.Error("capabilities must drop ALL")
		}
		if ctr.Resources.Requests.Cpu().IsZero() || ctr.Resources.Requests.Memory().IsZero() {
			t.Error("cpu and memory requests must be set")
		}
	})

	t.Run("the ServiceAccount reads what the server needs", func(t *testing.T) {
		sa := deploy.Spec.Template.Spec.ServiceAccountName
		get[corev1.ServiceAccount](t, objs, "ServiceAccount", sa)
		secret := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "reverst-token", Namespace: k.Namespace},
			StringData: map[string]string{"token": "t"},
		}
		if _, err := cs.CoreV1().Secrets(k.Namespace).Create(ctx, secret, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
		asSA := rest.CopyConfig(c.Admin)
		asSA.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + k.Namespace + ":" + sa}
		sacs := kubernetes.NewForConfigOrDie(asSA)
		if _, err := sacs.CoreV1().ConfigMaps(k.Namespace).Get(ctx, cm.Name, metav1.GetOptions{}); err != nil {
			t.Errorf("get ConfigMap %s as %s: %v", cm.Name, sa, err)
		}
		if _, err := sacs.CoreV1().Secrets(k.Namespace).Get(ctx, "reverst-token", metav1.GetOptions{}); err != nil {
			t.Errorf("get Secret reverst-token as %s: %v", sa, err)
		}
		// The TLS key is mounted by the kubelet, never read through the API.
		if _, err := sacs.CoreV1().Secrets(k.Namespace).Get(ctx, "reverst-tls", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("get Secret reverst-tls as %s: %v, want forbidden", sa, err)
		}
	})
}

// get finds the object of kind and name among objs, as a typed value.
func get[T any](t *testing.T, objs []*unstructured.Unstructured, kind, name string) *T {
	t.Helper()
	for _, obj := range objs {
		if obj.GetKind() == kind && obj.GetName() == name {
			v := new(T)
			convert(t, obj, v)
			return v
		}
	}
	t.Fatalf("no %s %q among the manifests", kind, name)
	return nil
}

func convert(t *testing.T, obj *unstructured.Unstructured, into any) {
	t.Helper()
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(obj.Object, into, true); err != nil {
		t.Fatalf("%s %s: %v", obj.GetKind(), obj.GetName(), err)
	}
}

func ptr[T any](v T) *T { return &v }
