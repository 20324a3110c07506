# kontain as a container image, in two stages: `build` compiles the server
# (the built-in plugins are compiled to wasm and embedded by host/build.rs);
# the final stage holds the stripped binary and nothing else.
#
#   docker build -t kontain .
#   docker run -p 8080:8080 kontain          # then: docker pull localhost:8080/random:4x100
#
# Both bases are arguments so that a mirror (or, in tests, a local
# stand-in) can take their place. The runtime base needs glibc and
# libgcc_s only; distroless/cc is that, running as uid 65532.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# rust-toolchain.toml pins the compiler and the wasm32-wasip2 target; with
# rustup (the official image), install exactly that first.
# No debug info in the image: a smaller binary, and a faster build.
RUN if command -v rustup >/dev/null; then rustup toolchain install; fi \
 && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build --release --locked --bin kontain \
 && cp target/release/kontain /kontain \
 && mkdir -p /state

FROM ${RUNTIME_IMAGE}
COPY --from=build /kontain /usr/local/bin/kontain
# The working directory holds storage (`kontain-data/`) and the compiled
# plugin cache; it must be writable by the unprivileged user.
COPY --from=build --chown=65532:65532 /state /var/lib/kontain
WORKDIR /var/lib/kontain
USER 65532:65532
# The built-in config listens on loopback; in a container, every interface.
# Mount a kontain.toml and pass `--config` to change anything else (storage
# on a GCS bucket, generators, limits): see the README.
ENV KONTAIN_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kontain"]
