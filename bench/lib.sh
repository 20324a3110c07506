# Shared by the benchmark scripts: `source "$(dirname "$0")/lib.sh"` after
# `set -euo pipefail`. Leaves the caller in the repository root with
# `$root`, a scratch directory `$work` and `pids` (killed on exit).
# KONTAIN_BIN=<path> runs another kontain binary (a before/after comparison).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
work=$(mktemp -d)
pids=()
cleanup() {
    # BENCH_LOGS=<dir> keeps the servers' logs (with BENCH_LOG=debug, say).
    if [[ -n ${BENCH_LOGS:-} ]]; then mkdir -p "$BENCH_LOGS" && find "$work" -maxdepth 2 -name log -exec sh -c 'cp "$1" "$2/$(basename "$(dirname "$1")").log"' _ {} "$BENCH_LOGS" \; ; fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }

# start_registry <name> <port> [proxy-remote-url]: Debian's docker-registry
# on loopback, storing under $work/<name>, logging at $registry_log (warn).
start_registry() {
    mkdir -p "$work/$1"
    {
        printf 'version: 0.1\nlog:\n  level: %s\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "${registry_log:-warn}" "$work/$1/data"
        printf 'http:\n  addr: 127.0.0.1:%s\n' "$2"
        if [[ -n ${3:-} ]]; then printf 'proxy:\n  remoteurl: %s\n' "$3"; fi
    } > "$work/$1/config.yml"
    docker-registry serve "$work/$1/config.yml" > "$work/$1/log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$2/v2/"
}

# kontain_config <dir> <upstream-port>: writes <dir>/kontain.toml: storage
# in <dir>/data, the registry on <upstream-port> as the named upstream
# `local`, then the TOML given on stdin (generators and their sections).
kontain_config() {
    mkdir -p "$1"
    {
        printf '[storage]\nbackend = "filesystem"\npath = "data"\n'
        printf '[upstream.registries.local]\nurl = "http://127.0.0.1:%s"\nallow_private = true\n' "$2"
        cat
    } > "$1/kontain.toml"
}

# start_kontain <dir> <port>: the release binary with <dir>/kontain.toml,
# metrics off (servers run side by side; the metrics port is fixed).
start_kontain() {
    (cd "$1" && PORT=$2 RUST_LOG=${BENCH_LOG:-warn} KONTAIN_METRICS_LISTEN="" exec "${KONTAIN_BIN:-$root/target/release/kontain}") > "$1/log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$2/v2/"
}
