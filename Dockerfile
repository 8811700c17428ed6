# Multi-stage build: compile in the Rust image, run from a slim Debian with only CA roots.
#   docker build -t xoauth-relay .      (or `docker compose up -d`, see docker-compose.yml)
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# What `cargo build --release --locked` reads: the manifest, the lock file and the crate's sources.
# examples/ is not built, but Cargo looks for the file of every target Cargo.toml declares when it
# loads the manifest, so an [[example]] entry would need it. Add build.rs or benches/ here if
# Cargo.toml starts to use them.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked

FROM debian:bookworm-slim
# The relay's user has a fixed UID/GID, 10587 (`relay`), so that bind mounts can be given to it:
#   mkdir -p data && chown -R 10587:10587 data && chmod 700 data
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10587 relay \
    && useradd --uid 10587 --gid relay --no-create-home --no-log-init \
       --home-dir /var/lib/xoauth-relay --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/xoauth-relay /usr/local/bin/xoauth-relay
WORKDIR /var/lib/xoauth-relay
# config/ holds the default config (config/relay.container.toml: listeners, metrics, no account), so
# the image runs without a mount; mount your own over it (docker-compose.yml says how). It belongs to
# root: the relay reads it, never writes it. certs/, data/ and keys/ are the relay's (volumes in
# docker-compose.yml); data/ and keys/ hold sealed grants, mail and the key: owner only (serve
# tightens data_dir anyway). A self-signed certificate is written to certs/ on first start unless
# one is there.
COPY config/relay.container.toml /var/lib/xoauth-relay/config/relay.toml
RUN chmod 0755 config && chmod 0644 config/relay.toml \
    && mkdir -p certs data keys \
    && chown relay:relay certs data keys \
    && chmod 0700 certs data keys
USER relay
ENV XOAUTH_RELAY_CONFIG=/var/lib/xoauth-relay/config/relay.toml
# The listeners and [metrics] of the default config: SMTP with STARTTLS, SMTP over implicit TLS,
# /metrics /healthz /readyz. Unprivileged, hence not 587/465: publish them there (docker-compose.yml).
EXPOSE 2587 2465 9587
# GET /readyz on [metrics] address: 200 once every listener is bound and the store is open.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 CMD ["xoauth-relay", "health"]
ENTRYPOINT ["xoauth-relay"]
CMD ["serve"]
