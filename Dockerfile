# Multi-stage build: compile in the Rust image, run from a slim Debian with only CA roots.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/xoauth-relay relay
COPY --from=build /src/target/release/xoauth-relay /usr/local/bin/xoauth-relay
WORKDIR /var/lib/xoauth-relay
# config/, certs/, data/ and keys/ are volumes (see docker-compose.yml).
# data/ and keys/ hold sealed grants, mail and the key: owner only (serve tightens them anyway).
RUN mkdir -p config certs data keys && chmod 0700 data keys && chown -R relay:relay /var/lib/xoauth-relay
USER relay
ENV XOAUTH_RELAY_CONFIG=/var/lib/xoauth-relay/config/relay.toml
EXPOSE 587 465
ENTRYPOINT ["xoauth-relay"]
CMD ["serve"]
