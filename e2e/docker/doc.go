// Package docker is the container suite: it builds the reverst image from
// the repository's Dockerfile, runs it on a real Docker engine configured
// by environment variables only, and drives it from the test process
// through the published UDP (QUIC) and TCP ports with the client library.
// It also brings the repository's compose.yaml up with docker compose and
// gets the example service's answer through the tunnel.
//
// The suite skips, loudly, only when no Docker engine answers and CI is
// unset; with CI set it fails instead. .ci/test starts an engine and
// makes the base images the Dockerfile names (see .ci/base-images).
package docker
