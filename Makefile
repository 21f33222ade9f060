# The two commands a new user needs:
#   make run   - the tunnel server on the bundled example, with the example
#                service registered through it; then
#                curl -H 'Host: flipt.dev.local' 127.0.0.1:8181/fo
#   make test  - the whole test suite, installing and starting what it needs
#                (Docker engine, kube-apiserver + etcd).
SHELL := /bin/bash
.PHONY: run test build bench

build:
	go build -o bin/reverst ./cmd/reverst
	go build -o bin/reverst-tunnel ./cmd/reverst-tunnel
	go build -o bin/example-simple ./examples/simple

# The server and the example service run together; when either stops (or
# on Ctrl-C) both stop.
run: build
	@trap 'trap - TERM; kill -TERM 0 2>/dev/null' INT TERM EXIT; \
	bin/reverst -l debug -n flipt.dev.local -g examples/simple/group.yml \
		-k examples/simple/server.key -c examples/simple/server.crt \
		--management-address 127.0.0.1:8080 & \
	sleep 1; \
	bin/example-simple --username user --password pass & \
	wait -n

test:
	./.ci/test
