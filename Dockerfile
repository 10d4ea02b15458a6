# The gateway and device-sim in a slim Debian image, run as a non-root user, data in a volume:
#   docker build -t iot-gateway .
#   docker run -v gateway-data:/data -p 8443:8443 -p 127.0.0.1:8080:8080 iot-gateway
ARG RUST_IMAGE=rust:1-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# Lets `docker image prune --filter label=iot-gateway.stage=build` find this stage's leftovers.
LABEL iot-gateway.stage=build
WORKDIR /src
COPY . .
# A builder image that already holds /out/gateway and /out/device-sim skips the compile: the
# compose test makes one from binaries built on the host, where no Rust image can be pulled.
RUN if [ ! -x /out/gateway ] || [ ! -x /out/device-sim ]; then \
        cargo build --release --locked -p gateway -p device-sim \
        && mkdir -p /out && cp target/release/gateway target/release/device-sim /out/; \
    fi

FROM ${DEBIAN_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home gateway \
    && mkdir /data && chown gateway:gateway /data
COPY --from=build /out/gateway /out/device-sim /usr/local/bin/
USER gateway
# The database (data/gateway.db), the API key and the development certificates (certs/)
# are made here on first start.
WORKDIR /data
VOLUME /data
EXPOSE 8443 8080
# bash's /dev/tcp: the slim image has no HTTP client.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--api-addr", "0.0.0.0:8080"]
