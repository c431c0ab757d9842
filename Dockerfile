# syntax=docker/dockerfile:1
# One image with the four service binaries; docker-compose.yml picks one per service by `command`.
#   docker build -t outbox-pipeline .
#   docker run --rm outbox-pipeline relay --help

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# rdkafka builds librdkafka from its bundled source: a C/C++ toolchain, make, cmake, perl, python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake pkg-config perl python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binaries are copied out in
# the same step because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for bin in producer relay consumer notifier; do cp "target/release/$bin" /out/; done

# ---------------------------------------------------------------- run
FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates for HTTPS webhooks, curl for the healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin outbox
COPY --from=builder /out/producer /out/relay /out/consumer /out/notifier /usr/local/bin/
USER outbox
ENV RUST_LOG=info
EXPOSE 8080 8081 8082 8083
# Overridden per service in docker-compose.yml (command: relay, consumer, notifier).
CMD ["producer"]
