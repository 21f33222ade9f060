// Package replicas is the scale-out suite: it runs three reverst server
// processes, built from ./cmd/reverst, on 127.0.0.1, 127.0.0.2 and
// 127.0.0.3 with the same ports, and clients of the client library that
// resolve one name to all three (through the client's resolver hook, as a
// Kubernetes headless Service would). It checks that the clients register
// on every replica, that each replica serves requests, and that killing a
// replica under load fails no request sent to the others and that the
// clients reattach when it comes back.
package replicas
