package app

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

func TestProcGovernor(t *testing.T) {
	type interval struct {
		cores                float64
		started, overlapping uint64
	}
	repeat := func(n int, iv interval) []interval {
		out := make([]interval, n)
		for i := range out {
			out[i] = iv
		}
		return out
	}
	concat := func(ivs ...[]interval) (out []interval) {
		for _, iv := range ivs {
			out = append(out, iv...)
		}
		return out
	}
	idle := interval{0.02, 0, 0}
	sequential := interval{0.6, 400, 3}    // one visitor, back to back
	concurrent := interval{0.3, 4000, 900} // light, but overlapping
	loaded := interval{0.7, 9000, 6000}
	saturated := interval{0.95, 400, 0}
	for _, tc := range []struct {
		name      string
		intervals []interval
		want      []bool // the decisions applied, single or not
	}{
		{"idle for long enough", repeat(governQuiet, idle), []bool{true}},
		{"idle not long enough", repeat(governQuiet-1, idle), nil},
		{"a busy interval restarts the count", concat(repeat(governQuiet-1, idle), []interval{loaded}, repeat(governQuiet-1, idle)), nil},
		{"sequential requests need one P", repeat(governQuiet, sequential), []bool{true}},
		{"light overlapping load needs one P", repeat(governQuiet, concurrent), []bool{true}},
		{"overlapping load keeps every P", repeat(3*governQuiet, loaded), nil},
		{"overlapping load brings them back", concat(repeat(governQuiet, idle), []interval{loaded}), []bool{true, false}},
		{"as does one saturated P", concat(repeat(governQuiet, sequential), []interval{saturated}), []bool{true, false}},
		{"sequential load stays on one P", concat(repeat(governQuiet, idle), repeat(50, sequential)), []bool{true}},
		{"light overlapping load stays on one P", concat(repeat(governQuiet, idle), repeat(50, concurrent)), []bool{true}},
		{"and back to one after the load", concat(repeat(governQuiet, idle), []interval{loaded}, repeat(governQuiet, idle)), []bool{true, false, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []bool
			g := &procGovernor{set: func(single bool) { got = append(got, single) }}
			for _, iv := range tc.intervals {
				g.observe(iv.cores, iv.started, iv.overlapping)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("decisions %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("decisions %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// The meter sees requests one after the other as not overlapping, and
// requests in flight together as overlapping.
func TestLoadMeter(t *testing.T) {
	var m loadMeter
	release := make(chan struct{})
	var waiting sync.WaitGroup
	srv := httptest.NewServer(m.wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/wait" {
			waiting.Done()
			<-release
		}
	})))
	defer srv.Close()
	get := func(path string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Error(err)
			return
		}
		resp.Body.Close()
	}
	for range 20 {
		get("/")
	}
	if started, overlapping := m.take(); started != 20 || overlapping != 0 {
		t.Fatalf("sequential: %d started, %d overlapping; want 20, 0", started, overlapping)
	}
	const n = 8
	waiting.Add(n)
	var done sync.WaitGroup
	for range n {
		done.Go(func() { get("/wait") })
	}
	waiting.Wait()
	close(release)
	done.Wait()
	if started, overlapping := m.take(); started != n || overlapping != n-1 {
		t.Fatalf("concurrent: %d started, %d overlapping; want %d, %d", started, overlapping, n, n-1)
	}
}

// Long requests in flight together (downloads, streams, WebSockets)
// overlap in every interval they span, not only in the one where they
// started: a server on one P whose only load is such requests gets its Ps
// back.
func TestLoadMeterLongRequestsOverlap(t *testing.T) {
	var m loadMeter
	release := make(chan struct{})
	var waiting sync.WaitGroup
	srv := httptest.NewServer(m.wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		waiting.Done()
		<-release
	})))
	defer srv.Close()
	const n = 4
	waiting.Add(n)
	var done sync.WaitGroup
	for range n {
		done.Go(func() {
			if resp, err := http.Get(srv.URL); err == nil {
				resp.Body.Close()
			}
		})
	}
	waiting.Wait()
	defer done.Wait()
	defer close(release)
	m.take() // the interval where they started

	var got []bool
	g := &procGovernor{set: func(single bool) { got = append(got, single) }, single: true}
	started, overlapping := m.take()
	g.observe(0.8, started, overlapping)
	if len(got) != 1 || got[0] {
		t.Fatalf("%d requests in flight (%d started, %d overlapping in the interval) on one P at 0.8 cores: decisions %v, want [false]", n, started, overlapping, got)
	}
}
