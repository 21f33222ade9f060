# The two commands a new user needs:
#   make run   - the tunnel server on the bundled example, with the example
#                service registered through it; then
#                curl -H 'Host: flipt.dev.local' 127.0.0.1:8181/fo
#   make test  - the whole test suite, installing and starting what it needs
#                (Docker engine, kube-apiserver + etcd).
SHELL := /bin/bash
.PHONY: run test build

build:
	go build -o bin/reverst ./cmd/reverst
	go build -o bin/reverst-tunnel ./cmd/reverst-tunnel
	go build -o bin/example-simple ./examples/simple

# The server and the example service run together; when either stops (or
# on Ctrl-C) both stop, and make exits with the status of the one that
# stopped. Polled rather than `wait -n`, which misses a process that
# exited before it was called (a server that could not listen stops
# within the first second).
run: build
	@trap 'trap - TERM; kill -TERM 0 2>/dev/null' INT TERM EXIT; \
	bin/reverst -l debug -n flipt.dev.local -g examples/simple/group.yml \
		-k examples/simple/server.key -c examples/simple/server.crt \
		--management-address 127.0.0.1:8080 & server=$$!; \
	sleep 1; \
	bin/example-simple --username user --password pass & example=$$!; \
	while kill -0 $$server 2>/dev/null && kill -0 $$example 2>/dev/null; do sleep 0.5; done; \
	if kill -0 $$server 2>/dev/null; then wait $$example; else wait $$server; fi; \
	status=$$?; trap - INT TERM EXIT; kill -TERM $$server $$example 2>/dev/null; exit $$status

test:
	./.ci/test
