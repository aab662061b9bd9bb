# minibatchd: release image.
#
#   docker build -t minibatchd .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:50052:50052 \
#     --ulimit memlock=-1:-1 minibatchd
#
# Serves the bundled sample (5,000 real MNIST digits, compiled into the
# binary) unless MINIBATCHD_DATA names a dataset, e.g. mnist.pkl.gz mounted
# at /data:  -v "$PWD/data:/data:ro" -e MINIBATCHD_DATA=/data/mnist.pkl.gz
#
# Pinning: the daemon mlock()s the dataset. A non-root process may lock only
# up to RLIMIT_MEMLOCK (Docker's default is far below a dataset's size), so
# run with --ulimit memlock=-1:-1 (compose: ulimits: memlock: -1). The log
# says "dataset memory pinned (mlock)" or warns "NOT pinned"; GetInfo's
# `pinned` (minibatchd info) says the same. See README "Deployment".
#
# Every serve flag is also an environment variable (MINIBATCHD_*); see
# `docker run --rm minibatchd --help`.
#
# The runtime base needs only glibc, libgcc_s and libm: distroless/cc is the
# smallest that has them; --build-arg RUNTIME_IMAGE=debian:bookworm-slim gives
# one with a shell for debugging.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:1.88-bookworm AS build
WORKDIR /src
# The whole tree minus .dockerignore: Cargo.toml, Cargo.lock, build.rs,
# proto/ (compiled by build.rs with protox, no protoc needed), src/ and
# data/mnist-sample.pkl.gz (include_bytes! in src/lib.rs).
COPY . .
RUN cargo build --release --locked --bin minibatchd \
 && objcopy --strip-debug target/release/minibatchd /minibatchd \
 && /minibatchd --version \
 && mkdir -p /rootfs-data

FROM ${RUNTIME_IMAGE}
COPY --from=build /minibatchd /usr/local/bin/minibatchd
# Mount point for a dataset (bind mount or volume, read-only is enough).
COPY --from=build /rootfs-data /data
# Non-root (numeric, so it holds on any base image).
USER 10001:10001
# In a container the daemon must listen on every interface.
ENV MINIBATCHD_ADDR=0.0.0.0:50051 \
    MINIBATCHD_METRICS_ADDR=0.0.0.0:50052 \
    NO_COLOR=1
# 50051: gRPC (BatchService, health, reflection); 50052: Prometheus /metrics.
EXPOSE 50051 50052
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/minibatchd", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/minibatchd", "serve"]
