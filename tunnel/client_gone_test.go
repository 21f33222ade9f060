package tunnel_test

import (
	"bytes"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/protocol"
	"github.com/reverst-dev/reverst/tunnel"
)

// A client that goes away before its register request is complete (its
// own register timeout, a Close, a crash) was not slow: the server's
// register timeout never ran out, so it must not be counted, nor logged,
// as a timeout.
func TestClientGoneIsNoTimeout(t *testing.T) {
	for _, half := range []bool{false, true} {
		t.Run(fmt.Sprintf("half a request %v", half), func(t *testing.T) {
			reg := prometheus.NewRegistry()
			e := startServerWith(t, func(s *tunnel.Server) {
				s.Metrics = tunnel.NewMetrics(reg)
				s.RegisterTimeout = time.Minute
			}, tunnel.Group{Name: "g", Hosts: []string{"g.example"}})
			conn := e.dialRaw(t)
			if half {
				str, err := conn.OpenStream()
				if err != nil {
					t.Fatal(err)
				}
				var req bytes.Buffer
				if err := protocol.WriteRequest(&req, &protocol.RegisterRequest{Version: 1, TunnelGroup: "g"}); err != nil {
					t.Fatal(err)
				}
				if _, err := str.Write(req.Bytes()[:req.Len()/2]); err != nil {
					t.Fatal(err)
				}
			}
			time.Sleep(100 * time.Millisecond)
			_ = conn.CloseWithError(protocol.CodeOK, "client closed")
			deadline := time.Now().Add(5 * time.Second)
			for {
				mfs, err := reg.Gather()
				if err != nil {
					t.Fatal(err)
				}
				var results []string
				for _, mf := range mfs {
					if mf.GetName() != "reverst_registrations_total" {
						continue
					}
					for _, m := range mf.GetMetric() {
						for _, l := range m.GetLabel() {
							if l.GetName() == "result" {
								results = append(results, l.GetValue())
							}
						}
					}
				}
				if len(results) > 0 {
					if slices.Contains(results, "timeout") {
						t.Fatalf("a client that closed after 100 ms counted as %v, with a one-minute register timeout", results)
					}
					t.Logf("counted as %v", results)
					return
				}
				if time.Now().After(deadline) {
					t.Fatal("no registration counted")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
