#!/usr/bin/env bash
# Benchmark of the plugin runtime (not a test: it asserts nothing).
#
# 1. Per-request plugin overhead: latency of a request a plugin answers at
#    once (the `wait` plugin refusing a malformed tag: instantiate + call +
#    error), against the same request to a name no plugin serves (routing and
#    the error response only), over keep-alive HTTP; median and p99, and
#    the difference, which is the plugin's cost.
# 2. Hot reload: time from renaming a new plugin version over the old file
#    to the first response from the new version (fixture v1 → v2), median of
#    several swaps.
#
# usage: bench/plugins.sh [requests]     (default 3000)
# KONTAIN_BIN=<path> runs another kontain binary (a before/after comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
requests=${1:-3000}

cargo build --release --quiet --bin kontain
plugins="$root/target/plugins/wasm32-wasip2/release"
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cp "$plugins/fixture_v1.wasm" "$work/swap.wasm"
cat > "$work/kontain.toml" <<TOML
[storage]
backend = "filesystem"
path = "data"
[generators.wait]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "$plugins/wait.wasm"
grants = ["cache", "random"]
[generators.swap]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "swap.wasm"
TOML
(cd "$work" && PORT=$port RUST_LOG=warn exec "${KONTAIN_BIN:-$root/target/release/kontain}") &
server=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done

python3 - "$port" "$requests" "$work" "$plugins" <<'PY'
import http.client, os, shutil, statistics, sys, time
port, n, work, plugins = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def latencies(path):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("HEAD", path)
        conn.getresponse().read()
        out.append(time.perf_counter() - t)
    return sorted(out)

def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6

base = latencies("/v2/nosuchgenerator/manifests/x")
plug = latencies("/v2/wait/manifests/not-a-duration")
print(f"per-request latency over {n} keep-alive HEADs (microseconds)")
print(f"{'':34} {'median':>8} {'p99':>8}")
print(f"{'no plugin (routing + error)':34} {pct(base, .5):8.0f} {pct(base, .99):8.0f}")
print(f"{'plugin instantiate + call':34} {pct(plug, .5):8.0f} {pct(plug, .99):8.0f}")
print(f"{'plugin overhead (difference)':34} {pct(plug, .5) - pct(base, .5):8.0f} {pct(plug, .99) - pct(base, .99):8.0f}")

def digest():
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("HEAD", "/v2/swap/manifests/latest")
    r = conn.getresponse(); r.read()
    return r.getheader("docker-content-digest")

swaps = []
versions = [os.path.join(plugins, "fixture_v2.wasm"), os.path.join(plugins, "fixture_v1.wasm")]
for i in range(6):
    before = digest()
    tmp = os.path.join(work, "swap.tmp")
    shutil.copy(versions[i % 2], tmp)
    t = time.perf_counter()
    os.rename(tmp, os.path.join(work, "swap.wasm"))
    while digest() == before:
        if time.perf_counter() - t > 30:
            sys.exit("the new version never answered")
        time.sleep(0.002)
    swaps.append(time.perf_counter() - t)
print(f"\nfile change to new version serving: median {statistics.median(swaps) * 1e3:.0f} ms, "
      f"max {max(swaps) * 1e3:.0f} ms over {len(swaps)} swaps (includes the 150 ms debounce)")
PY
