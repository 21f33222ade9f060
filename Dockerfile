# reverst: the tunnel server as a small static image.
#
#   docker build -t reverst .                       # the server (default target)
#   docker build -t reverst-example --target example .   # the demo service
#
# Base images are build arguments whose defaults are the public images. A
# machine that can pull nothing (like CI here) tags locally made images
# with the same names first: see .ci/base-images.
ARG GO_IMAGE=golang:1.26
ARG RUNTIME_IMAGE=scratch

FROM ${GO_IMAGE} AS build
WORKDIR /src
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-trimpath
# Modules, and the heavy dependencies compiled, in layers of their own:
# cached until go.mod changes, so that a source change rebuilds in seconds
# rather than minutes (the classic builder has no build cache mounts).
# The list is only a warm-up: a package missing from it costs time, never
# correctness.
COPY go.mod go.sum ./
RUN go mod download
RUN for p in \
      k8s.io/client-go/kubernetes \
      k8s.io/client-go/tools/cache \
      k8s.io/client-go/tools/clientcmd \
      github.com/quic-go/quic-go/http3 \
      github.com/prometheus/client_golang/prometheus/promhttp \
      github.com/prometheus/client_golang/prometheus/collectors \
      github.com/vmihailenco/msgpack/v5 \
      github.com/caarlos0/env/v11 \
      github.com/fsnotify/fsnotify \
      go.yaml.in/yaml/v3; \
    do go build "$p" || echo "warm-up: skipped $p"; done
COPY . .
RUN go build -ldflags='-s -w' -o /out/reverst ./cmd/reverst \
 && go build -ldflags='-s -w' -o /out/reverst-example ./examples/simple \
 && mkdir -p /out/rootfs/etc/ssl/certs /out/rootfs/tmp \
 && cp /etc/ssl/certs/ca-certificates.crt /out/rootfs/etc/ssl/certs/ \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' >/out/rootfs/etc/passwd \
 && echo 'nonroot:x:65532:' >/out/rootfs/etc/group \
 && chmod 1777 /out/rootfs/tmp

# The demo service of examples/simple; it registers with a tunnel server
# and needs nothing but its flags (see compose.yaml).
FROM ${RUNTIME_IMAGE} AS example
COPY --from=build /out/rootfs/ /
COPY --from=build /out/reverst-example /reverst-example
USER 65532:65532
ENTRYPOINT ["/reverst-example"]

# The server, configured by REVERST_* environment variables (or flags).
# Listen addresses default to all interfaces, as a container needs; the
# certificate, key, server name and groups come from the environment
# (mount them, e.g. under /etc/reverst).
FROM ${RUNTIME_IMAGE} AS server
COPY --from=build /out/rootfs/ /
COPY --from=build /out/reverst /reverst
ENV REVERST_TUNNEL_ADDRESS=0.0.0.0:7171 \
    REVERST_HTTP_ADDRESS=0.0.0.0:8181 \
    REVERST_MANAGEMENT_ADDRESS=0.0.0.0:8080
EXPOSE 7171/udp 7171/tcp 8181/tcp 8080/tcp
USER 65532:65532
# No shell in the image: the binary probes its own /readyz.
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s CMD ["/reverst", "healthcheck"]
ENTRYPOINT ["/reverst"]
