# syntax=docker/dockerfile:1
# Multi-stage build of the three paysuite services into minimal non-root images, one per
# target:
#
#   docker build --target payment-svc   -t ghcr.io/paysuite/payment-svc:0.1.0 .
#   docker build --target ratelimit-svc -t ghcr.io/paysuite/ratelimit-svc:0.1.0 .
#   docker build --target gateway-svc   -t ghcr.io/paysuite/gateway-svc:0.1.0 .
#
# The build stage compiles the workspace once in release mode (no `failpoints` feature:
# it never ships). protox compiles the protos, so no protoc is needed. Runtime images are
# distroless `cc` (glibc and libgcc, no shell, no package manager) running as uid 65532;
# TLS is rustls with bundled roots, so no system certificate store is read.
# NOTE: not built on the machine this was written on (no container engine there); it is
# linted by `cargo xtask test` (checkov --framework dockerfile).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p payment-svc -p ratelimit-svc -p gateway-svc \
    && mkdir -p /out \
    && cp target/release/payment-svc target/release/sandbox-acquirer \
          target/release/ratelimit-svc target/release/gateway-svc /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
# Kubernetes probes the services over gRPC health (numeric ports, `readiness`); the image
# has no shell or client to run a Docker health check with.
HEALTHCHECK NONE

FROM runtime AS payment-svc
COPY --from=build /out/payment-svc /out/sandbox-acquirer /usr/local/bin/
EXPOSE 50052
ENTRYPOINT ["/usr/local/bin/payment-svc"]
CMD ["serve"]

FROM runtime AS ratelimit-svc
COPY --from=build /out/ratelimit-svc /usr/local/bin/
EXPOSE 50053
ENTRYPOINT ["/usr/local/bin/ratelimit-svc"]

FROM runtime AS gateway-svc
COPY --from=build /out/gateway-svc /usr/local/bin/
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/gateway-svc"]
