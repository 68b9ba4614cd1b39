# syntax=docker/dockerfile:1
# The `meshwire` binary (relay + registry: `meshwire serve`) in a small
# runtime image. Build from the repository root:
#
#   docker build -t meshwire:dev .
#   docker run --rm -p 8765:8765 -v meshwire-data:/var/lib/meshwire meshwire:dev
#
# See docs/deploy.md for the settings, TLS, NATS and Kubernetes.

# ── build ──────────────────────────────────────────────────────────────
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace: Cargo needs every member's manifest.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p meshwire-cli --bin meshwire \
    && install -D -m 0755 target/release/meshwire /out/meshwire

# ── run ────────────────────────────────────────────────────────────────
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/meshwire --shell /usr/sbin/nologin meshwire \
    && install -d -m 0700 -o meshwire -g meshwire /var/lib/meshwire
COPY --from=build /out/meshwire /usr/local/bin/meshwire
USER 10001:10001
# Logs as JSON lines on stderr; every flag has a MESHWIRE_* variable.
ENV MESHWIRE_LOG_FORMAT=json
EXPOSE 8765
VOLUME ["/var/lib/meshwire"]
# SIGTERM (docker stop, Kubernetes) drains: relay sockets close with 1001,
# the store is flushed, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/meshwire", "serve"]
CMD ["--listen", "0.0.0.0:8765", "--data-dir", "/var/lib/meshwire"]
