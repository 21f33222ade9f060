package kubetest

import (
	"context"
	"os"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

var cluster Shared

func TestMain(m *testing.M) {
	code := m.Run()
	cluster.Stop()
	os.Exit(code)
}

func TestUsers(t *testing.T) {
	c := cluster.Get(t)
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(c.Admin)
	if _, err := admin.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Fatalf("admin: %v", err)
	}
	user := kubernetes.NewForConfigOrDie(c.User)
	_, err := user.CoreV1().ConfigMaps("default").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("unprivileged user listing ConfigMaps: %v, want Forbidden", err)
	}
}
