# kontain as a container image. Three stages; one `docker build` makes all of
# them, the compile once:
#
#   build   compiles the server (host/build.rs compiles the built-in plugins
#           to wasm and embeds them);
#   slim    the stripped binary on distroless/cc and nothing else: random,
#           mirror and flatten (ko and buildpack need tools it lacks);
#   full    (the default) Debian with Go (1.23, backports), git and
#           bubblewrap, so that every generator works, ko and buildpack
#           included.
#
#   docker build -t kontain .                   # the default: full
#   docker build --target slim -t kontain:slim .
#   docker run -p 8080:8080 kontain             # then: docker pull localhost:8080/random:4x100
#
# buildpack runs each buildpack in a bubblewrap sandbox, which needs user
# namespaces and its own /proc; Docker's defaults forbid both. Run the full
# image with
#
#   docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#       --security-opt systempaths=unconfined -p 8080:8080 kontain
#
# (docs/deploy.md says why each is needed, and what Kubernetes and Cloud Run
# need). Without them everything else works, and buildpack pulls answer a
# clear 503 saying the sandbox cannot start.
#
# Every base is an argument so that a mirror (or, in tests, a local stand-in)
# can take its place. The Debian base is pinned to a point release.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG DEBIAN_IMAGE=docker.io/library/debian:12.11-slim

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

FROM ${RUNTIME_IMAGE} AS slim
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

FROM ${DEBIAN_IMAGE} AS full
# go builds ko images; git fetches buildpack sources; bubblewrap sandboxes
# buildpacks. Go from bookworm-backports (1.23): bookworm's own 1.19 cannot
# build most modules of today (`go 1.21`+ lines, `toolchain` lines), and
# builds run with GOTOOLCHAIN=local (no downloads of other toolchains).
# --no-install-recommends keeps the image to what runs.
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" \
      > /etc/apt/sources.list.d/backports.list \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      -t bookworm-backports golang-go \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates git bubblewrap \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kontain \
 && useradd --uid 65532 --gid 65532 --home-dir /var/lib/kontain --no-create-home kontain \
 && mkdir -p /var/lib/kontain \
 && chown 65532:65532 /var/lib/kontain
COPY --from=build /kontain /usr/local/bin/kontain
WORKDIR /var/lib/kontain
USER 65532:65532
ENV KONTAIN_LISTEN=0.0.0.0:8080 HOME=/var/lib/kontain
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kontain"]
