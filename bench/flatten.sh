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
source "$(dirname "$0")/lib.sh"
runs=${1:-3}

cargo build --release --quiet --bin kontain

# The source image as an OCI layout.
layout="$work/layout"
mkdir -p "$layout/blobs/sha256" "$work/layers"
i=0
for dir in /usr/include /usr/lib/python3 /usr/share/perl; do
    i=$((i + 1))
    tar -C / --sort=name --mtime=@0 -cf - "${dir#/}" | gzip -1 > "$work/layers/$i.tar.gz"
done
PYTHONPATH="$root/bench" python3 - "$work/layers" "$layout" <<'PY'
import gzip, os, sys
from oci_layout import Layout, sha256
layers_dir, out = sys.argv[1], Layout(sys.argv[2])
gz = [open(os.path.join(layers_dir, n), "rb").read() for n in sorted(os.listdir(layers_dir))]
out.tag("latest", out.image(gz, [sha256(gzip.decompress(g)) for g in gz], config={}))
PY

up=$(free_port)
start_registry upstream "$up"
skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "docker://127.0.0.1:$up/bench:latest"

port=$(free_port)
kontain_config "$work/kontain" "$up" <<TOML
[generators.mirror]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:mirror"
grants = ["upstream"]
[generators.flatten]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:flatten"
grants = ["upstream", "flatten"]
TOML
start_kontain "$work/kontain" "$port"
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

# Compression: the flattened layer against `gzip -1` of the same tar.
layer=$(curl -sf -H "Accept: $accept" "http://127.0.0.1:$port/v2/flatten/local/bench/manifests/latest" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["layers"][0]["digest"])')
curl -sf -o "$work/flat.tar.gz" "http://127.0.0.1:$port/v2/flatten/local/bench/blobs/$layer"
ours_size=$(wc -c < "$work/flat.tar.gz")
gzip1_size=$(zcat "$work/flat.tar.gz" | gzip -1 | wc -c)
printf '%-36s %8.1f MB\n' "flattened layer (kontain)" "$(awk -v n="$ours_size" 'BEGIN { print n / 1e6 }')"
printf '%-36s %8.1f MB\n' "gzip -1 of the same tar" "$(awk -v n="$gzip1_size" 'BEGIN { print n / 1e6 }')"
printf '%-36s %8.2f\n' "size ratio (kontain / gzip -1)" "$(awk -v a="$ours_size" -v b="$gzip1_size" 'BEGIN { print a / b }')"
