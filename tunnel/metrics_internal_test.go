package tunnel

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMemberGaugeOfRemovedGroupStaysDeleted(t *testing.T) {
	// A member that leaves, or joins, as its group is removed by a reload
	// updates the gauge after the group's series was deleted: it must not
	// bring the series back.
	m := NewMetrics(prometheus.NewRegistry())
	g := (&Server{}).newGroup("g")
	if !g.add(&member{}) {
		t.Fatal("member not added")
	}
	m.setMembers(g)
	if got := testutil.ToFloat64(m.members.WithLabelValues("g")); got != 1 {
		t.Fatalf("gauge %v, want 1", got)
	}
	g.retire()
	m.groupRemoved(g)
	m.setMembers(g) // late
	if n := testutil.CollectAndCount(m.members); n != 0 {
		t.Fatalf("%d member series after the group was removed", n)
	}
}
