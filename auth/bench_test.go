package auth

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
)

// BenchmarkExternalWarm measures registrations answered from the decision
// cache; BenchmarkExternalCold those that call the endpoint every time
// (a new token each iteration). Both report registrations/s.
func BenchmarkExternalWarm(b *testing.B) { benchmarkExternal(b, true) }
func BenchmarkExternalCold(b *testing.B) { benchmarkExternal(b, false) }

func benchmarkExternal(b *testing.B, warm bool) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer s.Close()
	f := &Factory{}
	a, err := f.New(externalAuth(s.URL))
	if err != nil {
		b.Fatal(err)
	}
	metadata := md("Bearer warm-token")
	if err := a.Authenticate(b.Context(), metadata); err != nil {
		b.Fatal(err)
	}
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		if !warm {
			i++
			metadata = md("Bearer cold-token-" + strconv.Itoa(i))
		}
		if err := a.Authenticate(b.Context(), metadata); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "registrations/s")
}
