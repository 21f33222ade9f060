// Package faults is the fault-injection suite of the data path. Every test
// runs the real server (./cmd/reverst, built once per test binary) and
// real member processes (./e2e/faults/member, a client.Server with the
// library's defaults) on loopback, with the test process as the visitors,
// and injects one fault: a member SIGKILLed (under load, and holding
// requests of every kind) or SIGTERMed under load, a rolling restart, the
// server down for 2 s and for 60 s, handler panics, visitors that reset
// their TCP connection mid-request. It also checks what only a real
// process shows: flushed chunks arrive on time, a WebSocket echoes through
// both processes, and a 1 GiB upload reaches the member's handler as it
// is sent, leaving both processes' peak RSS bounded.
//
// Each test logs its counts (requests sent, failed) and figures (removal
// and reconnect times, throughput, RSS, CPU). The 60 s outage runs only
// without -short.
package faults
