package client

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	lo, hi := 100*time.Millisecond, time.Second
	for failures, want := range []time.Duration{lo, 2 * lo, 4 * lo, 8 * lo, hi, hi, hi} {
		for range 100 {
			if d := backoff(lo, hi, failures); d < want/2 || d > want {
				t.Fatalf("backoff after %d failures = %v, want in [%v, %v]", failures, d, want/2, want)
			}
		}
	}
	if d := backoff(lo, hi, 1000); d > hi {
		t.Errorf("backoff after many failures = %v, over the cap", d)
	}
}
