#!/usr/bin/env bash
# Benchmark of the `random` generator (not a test: it asserts nothing).
#
# Prints, for HEAD random:1x10000000, random:1x99999999 (one 100 MB layer)
# and random:8x50000000, the median
# latency next to a baseline measured in the same run — sha256 of the same
# number of bytes twice plus writing them to disk (host/examples/baseline.rs),
# single-threaded — and the ratio; then the server's peak RSS while serving
# random:20x50000000.
#
# usage: bench/random.sh [runs]      (default 7)
# KONTAIN_BIN=<path> runs another kontain binary (a before/after comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}

cargo build --release --quiet --bin kontain --example baseline
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/kontain.toml" <<TOML
[storage]
backend = "filesystem"
path = "data"
[generators.random]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:random"
grants = ["random"]
[generators.random.limits]
timeout = "600s"
max_bytes = "10GB"
TOML
(cd "$work" && PORT=$port RUST_LOG=warn exec "${KONTAIN_BIN:-$OLDPWD/target/release/kontain}") &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

head_latency() {
    for _ in $(seq "$runs"); do
        curl -sf -o /dev/null -I -w '%{time_total}\n' "http://127.0.0.1:$port/v2/random/manifests/$1"
    done | median
}

printf '%-24s %12s %12s %8s\n' "request" "kontain (s)" "baseline (s)" "ratio"
for spec in 1x10000000 1x99999999 8x50000000; do
    n=${spec%x*}; m=${spec#*x}
    ours=$(head_latency "$spec")
    base=$(target/release/examples/baseline $((n * m)) "$work" "$runs")
    printf '%-24s %12.4f %12.4f %8.2f\n' "HEAD random:$spec" "$ours" "$base" "$(awk -v a="$ours" -v b="$base" 'BEGIN { print a / b }')"
    rm -rf "$work/data/blobs/sha256/"*
done

# Peak RSS of a fresh server while it serves 20 × 50 MB.
kill $server; wait $server 2>/dev/null || true
(cd "$work" && PORT=$port RUST_LOG=warn exec "${KONTAIN_BIN:-$OLDPWD/target/release/kontain}") &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
t=$(curl -sf -o /dev/null -I -w '%{time_total}' "http://127.0.0.1:$port/v2/random/manifests/20x50000000")
rss=$(awk '/VmHWM/ {print $2}' /proc/$server/status)
printf 'peak RSS serving random:20x50000000: %d MiB (took %.2f s; limit 200 MiB)\n' $((rss / 1024)) "$t"
