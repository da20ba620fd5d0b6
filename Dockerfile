# pushgate: multi-stage build, small non-root runtime image.
#
#   docker build -t pushgate .
#   docker run -p 8080:8080 -v $PWD/pushgate.yaml:/etc/pushgate/pushgate.yaml:ro pushgate
#
# The config is read from /etc/pushgate/pushgate.yaml (mount your own there,
# or override keys with PUSHGATE_* environment variables). In a container the
# public listener must bind 0.0.0.0, e.g. PUSHGATE_LISTEN=0.0.0.0:8080; that
# needs an auth mode that asks the app (auth.mode none, which lets anyone hear
# every channel, is refused on a non-loopback listener).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin pushgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pushgate
COPY --from=build /src/target/release/pushgate /usr/local/bin/pushgate
COPY config.example.yaml /etc/pushgate/pushgate.yaml
ENV PUSHGATE_LISTEN=0.0.0.0:8080
USER pushgate
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pushgate"]
CMD ["--config", "/etc/pushgate/pushgate.yaml"]
