# syntax=docker/dockerfile:1
# meshflow images, built from this repository (docker build / podman build / buildah):
#
#   docker build --target control-plane -t <registry>/meshflow/control-plane:0.1.0 .
#   docker build --target proxy         -t <registry>/meshflow/proxy:0.1.0 .
#
# The build stages start from `source`, which installs what CI installs (scripts/install-deps
# build: cmake and a C toolchain for Pingora); the final stages hold only the
# binary, the CA certificates and a non-root user (65532, like distroless "nonroot").
#
# The proxy image's sidecar is the profile-guided build by default (stage proxy-build-1:
# scripts/build-pgo-proxy — an instrumented build, a minute of mixed mesh traffic on 127.0.0.1
# inside the build, llvm-profdata from Debian's llvm-19, the optimized build; 20–35 more
# minutes on 2 cores), the binary bench/mesh-compare measures. `--build-arg PGO=0` ships the
# plain release build (stage proxy-build-0); any other value names no stage and fails. The
# control-plane image never runs the PGO stages.
# Not built by CI: its machines have no container runtime (see README, "Kubernetes"); CI
# builds the plain binaries only; `PGO=1 bench/mesh-compare` runs scripts/build-pgo-proxy.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG PGO=1

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS source
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps build

# The registry and target caches survive between builds (BuildKit cache mounts, one build at
# a time), so the binaries are copied out of target/ in the same step.
FROM source AS build
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p meshflow-control-plane \
    && mkdir -p /out \
    && cp target/release/meshflow-control-plane /out/

FROM source AS proxy-build-0
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p meshflow-proxy \
    && mkdir -p /out \
    && cp target/release/meshflow-proxy /out/

FROM source AS proxy-build-1
# In a layer of its own, before the sources: kept across source changes.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends llvm-19 \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    scripts/build-pgo-proxy \
    && mkdir -p /out \
    && cp target/release-pgo/meshflow-proxy /out/

FROM proxy-build-${PGO} AS proxy-build

# Shared runtime base: glibc of the same Debian release as the build stage, no shell tools
# beyond slim's, CA roots for outbound TLS (OTLP, PostgreSQL), an unprivileged user.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
COPY --from=source /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /

FROM runtime AS proxy
COPY --from=proxy-build /out/meshflow-proxy /usr/local/bin/meshflow-proxy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshflow-proxy"]

# Last, so a plain `docker build .` gives the control plane (the chart's image).
FROM runtime AS control-plane
COPY --from=build /out/meshflow-control-plane /usr/local/bin/meshflow-control-plane
USER 65532:65532
# gRPC (Certify, Watch) and admin (/metrics, /ready, /config_dump); the chart passes the flags.
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/meshflow-control-plane"]
