#!/usr/bin/env bash
# Benchmark of the `flatten` generator (not a test: it asserts nothing).
#
# Source image: three layers made from this machine's /usr/include,
# /usr/lib/python3 and /usr/share/perl (real, compressible files), pushed to a
# loopback docker-registry. Its blobs are first pulled through kontain's
# mirror, so that the flatten is timed on local blobs. Baseline, measured in
# the same run: `zcat` of the three layers piped to `gzip -1` — decompressing
# and recompressing the same bytes once, with no merge and no hashing.
#
# usage: bench/flatten.sh [runs]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
runs=${1:-3}

cargo build --release --quiet --bin kontain
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The source image as an OCI layout.
layout="$work/layout"
mkdir -p "$layout/blobs/sha256" "$work/layers"
i=0
for dir in /usr/include /usr/lib/python3 /usr/share/perl; do
    i=$((i + 1))
    tar -C / --sort=name --mtime=@0 -cf - "${dir#/}" | gzip -1 > "$work/layers/$i.tar.gz"
done
python3 - "$work/layers" "$layout" <<'PY'
import gzip, hashlib, json, os, shutil, sys
layers_dir, layout = sys.argv[1], sys.argv[2]
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(layout, "blobs/sha256", d), "wb").write(data)
    return "sha256:" + d, len(data)
layers, diff_ids = [], []
for name in sorted(os.listdir(layers_dir)):
    data = open(os.path.join(layers_dir, name), "rb").read()
    diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
    d, n = blob(data)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
config = {"architecture": "amd64", "os": "linux", "config": {},
          "rootfs": {"type": "layers", "diff_ids": diff_ids}}
cd, cn = blob(json.dumps(config).encode())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
            "layers": layers}
md, mn = blob(json.dumps(manifest).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": manifest["mediaType"], "digest": md, "size": mn,
           "annotations": {"org.opencontainers.image.ref.name": "latest"}}]},
          open(os.path.join(layout, "index.json"), "w"))
open(os.path.join(layout, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
PY

up=$(free_port)
mkdir -p "$work/upstream"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/upstream/data" "$up" > "$work/upstream/config.yml"
docker-registry serve "$work/upstream/config.yml" > "$work/upstream/log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$up/v2/"
skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "docker://127.0.0.1:$up/bench:latest"

port=$(free_port)
mkdir -p "$work/kontain"
cat > "$work/kontain/kontain.toml" <<TOML
[storage]
backend = "filesystem"
path = "data"
[upstream.registries.local]
url = "http://127.0.0.1:$up"
allow_private = true
[generators.mirror]
source = "builtin:mirror"
grants = ["upstream"]
[generators.flatten]
source = "builtin:flatten"
grants = ["upstream", "flatten"]
TOML
(cd "$work/kontain" && PORT=$port RUST_LOG=warn exec "$root/target/release/kontain") > "$work/kontain/log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$port/v2/"
# Warm the blob cache through the mirror.
skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/mirror/local/bench:latest" "oci:$work/warm:x"

accept='application/vnd.oci.image.manifest.v1+json'
flatten_once() {
    rm -rf "$work/kontain/data/values"/* # forget earlier results; keep the source blobs
    curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}\n' \
        "http://127.0.0.1:$port/v2/flatten/local/bench/manifests/latest"
}
ours=$(for _ in $(seq "$runs"); do flatten_once; done | median)
base=$(for _ in $(seq "$runs"); do
    s=$(date +%s.%N); zcat "$work"/layers/*.tar.gz | gzip -1 > /dev/null
    awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'
done | median)
unpacked=$(zcat "$work"/layers/*.tar.gz | wc -c)
cached=$(curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}' \
    "http://127.0.0.1:$port/v2/flatten/local/bench/manifests/latest")

printf 'flatten of 3 layers, %d MB unpacked (median of %d)\n' $((unpacked / 1000000)) "$runs"
printf '%-36s %8.3f s %8.1f MB/s\n' "kontain flatten (cold)" "$ours" "$(awk -v u="$unpacked" -v t="$ours" 'BEGIN { print u / t / 1e6 }')"
printf '%-36s %8.3f s %8.1f MB/s\n' "zcat | gzip -1 (baseline)" "$base" "$(awk -v u="$unpacked" -v t="$base" 'BEGIN { print u / t / 1e6 }')"
printf '%-36s %8.2f\n' "ratio (kontain / baseline)" "$(awk -v a="$ours" -v b="$base" 'BEGIN { print a / b }')"
printf '%-36s %8.3f s\n' "kontain flatten (cached result)" "$cached"
