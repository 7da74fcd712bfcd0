# syntax=docker/dockerfile:1
# The production image carries listrak-worker alone (the last stage, built by default):
#   docker build -t listrak-worker .
#   docker run --rm listrak-worker listrak-worker check --config /etc/listrak-worker/config.toml
# The demo stack (docker-compose.yml) builds the `demo` stage, which adds listrak-fake, the
# stand-in for Listrak's API. The benchmark is built in neither.
# The image runs `listrak-worker run`; mount the configuration at
# /etc/listrak-worker/config.toml and pass credentials as AMQP_URL, LISTRAK_CLIENT_ID and
# LISTRAK_CLIENT_SECRET.

FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. Empty targets stand in for the sources.
# .cargo/config.toml carries a build-time setting of the allocator (see it).
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
RUN mkdir -p src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/listrak-fake.rs \
    && echo 'fn main() {}' > src/bin/listrak-bench.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin listrak-worker --bin listrak-fake \
    && rm -rf src

COPY src ./src
# COPY keeps the sources' modification times, which may be older than the stand-ins'
# build: touch them so cargo rebuilds the crate itself.
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin listrak-worker --bin listrak-fake \
    && install -D -m 0755 -t /out target/release/listrak-worker target/release/listrak-fake

FROM debian:bookworm-slim AS runtime
# ca-certificates: Listrak's API is HTTPS. curl: the HEALTHCHECK below and Compose's
# health checks. It is the simplest probe that is robust: a shell /dev/tcp probe would
# have to parse HTTP by hand, and a probe mode in the worker would add an HTTP client mode
# that only Docker needs (Kubernetes probes the same endpoints itself).
# Versions are not pinned (DL3008): Debian drops superseded versions from its mirrors, so a
# pin breaks the build; the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 listrak \
    && useradd --system --uid 10001 --gid listrak --no-create-home --shell /usr/sbin/nologin listrak

COPY config/example.toml /etc/listrak-worker/example.toml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENV LISTRAK_WORKER_CONFIG=/etc/listrak-worker/config.toml \
    LOG_FORMAT=json
# /metrics, /healthz, /readyz (http.listen).
EXPOSE 9464
# The worker drains and acknowledges on SIGTERM within shutdown.grace (30s by default):
# give `docker stop` a longer --time (Compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9464/healthz"]
CMD ["listrak-worker", "run"]

FROM runtime AS demo
COPY --from=builder /out/listrak-worker /out/listrak-fake /usr/local/bin/

FROM runtime AS worker
COPY --from=builder /out/listrak-worker /usr/local/bin/
