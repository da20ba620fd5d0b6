# pushgate: multi-stage build, small non-root runtime image.
#
#   docker build -t pushgate .      # profile-guided; --build-arg PGO=false: plain
#   docker run -p 8080:8080 -v $PWD/pushgate.yaml:/etc/pushgate/pushgate.yaml:ro pushgate
#
# The config is read from /etc/pushgate/pushgate.yaml (mount your own there,
# or override keys with PUSHGATE_* environment variables). In a container the
# public listener binds 0.0.0.0, so realtime connections must be authorized
# by the app: the image sets auth.mode upstream (auth.mode none is refused on
# a non-loopback listener). Set at least PUSHGATE_UPSTREAM__URL and
# PUSHGATE_API__KEYS, and PUSHGATE_API__LISTEN=0.0.0.0:8081 if the app's
# backend reaches the API from another container.

FROM rust:1-slim-bookworm AS build
# make, for jemalloc (the binary's allocator), which builds from C; curl,
# for the profile-guided build's training run.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The browser client is built into the binary (/realtime/client.js).
COPY clients/js/pushgate.js ./clients/js/pushgate.js
COPY bench ./bench
COPY benches ./benches
# Profile-guided by default (bench/pgo.sh: built twice, with a training run
# between; 5-12 % less CPU per proxied request: docs/benchmarks.md, scenario
# e); `--build-arg PGO=false` builds once, plain.
ARG PGO=true
RUN if [ "$PGO" = true ]; then \
        bench/pgo.sh && cp target/pgo/release/pushgate /pushgate; \
    else \
        cargo build --release --locked --bin pushgate && cp target/release/pushgate /pushgate; \
    fi

FROM debian:bookworm-slim
# CA roots for https:// JWKS URLs and rediss:// Redis with a public CA.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pushgate
COPY --from=build /pushgate /usr/local/bin/pushgate
COPY config.example.yaml /etc/pushgate/pushgate.yaml
ENV PUSHGATE_LISTEN=0.0.0.0:8080 \
    PUSHGATE_AUTH__MODE=upstream
USER pushgate
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pushgate"]
CMD ["--config", "/etc/pushgate/pushgate.yaml"]
