# syntax=docker/dockerfile:1
# Container image of the operator. The binary is built in the Rust image and
# runs on distroless/cc: glibc and CA certificates, no shell, no package
# manager, user 65532 (nonroot). The chart runs it with a read-only root
# filesystem as that user, and exposes the same two ports.
#
#   docker build -t registry.example.com/kameleoon-cohort-operator:0.1.0 .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crates and the build between builds; the binary
# is copied out of the mounted target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kameleoon-cohort-operator \
    && cp target/release/kameleoon-cohort-operator /kameleoon-cohort-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="kameleoon-cohort-operator" \
      org.opencontainers.image.description="Kubernetes operator that exports Mixpanel cohorts to Kameleoon" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /kameleoon-cohort-operator /usr/local/bin/kameleoon-cohort-operator
USER 65532:65532
# 8080: /metrics (chart value metrics.port); 8081: /healthz and /readyz
# (chart value health.port).
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/kameleoon-cohort-operator"]
CMD ["run", "--metrics-address=0.0.0.0:8080", "--health-address=0.0.0.0:8081"]
