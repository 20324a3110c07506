#!/usr/bin/env bash
# Benchmark of the `mirror` generator (not a test: it asserts nothing).
#
# Upstream: Debian's docker-registry on loopback, seeded with a 3 × 20 MB
# image (made by kontain's random generator). Compared in one run:
#   - docker pull straight from the upstream (the baseline),
#   - through kontain's mirror, cold and warm,
#   - through docker-registry in proxy mode (pull-through cache), cold and warm;
# the number of blob GETs the upstream sees under 10 concurrent cold pulls
# (skopeo) through each cache; and the time to the first byte (and to the
# last) of a cold 20 MB layer through kontain against the upstream directly,
# on loopback and behind 50 ms of latency (bench/latency.py: a registry
# across the internet), the medians of the three layers.
#
# usage: bench/mirror.sh          (needs root: it starts its own dockerd)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

cargo build --release --quiet --bin kontain

elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# The upstream's log counts its blob GETs.
registry_log=info
registry() { start_registry "$@"; }

kontain() { # name port upstream-port
    kontain_config "$work/$1" "$3" <<TOML
[generators.mirror]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:mirror"
grants = ["upstream"]
[generators.random]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:random"
grants = ["random"]
TOML
    start_kontain "$work/$1" "$2"
}

# The upstream, seeded through a throwaway kontain's random generator.
up=$(free_port); registry upstream "$up"
seed=$(free_port); kontain seed "$seed" "$up"
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
    "docker://127.0.0.1:$seed/random:3x20000000" "docker://127.0.0.1:$up/bench:latest"

# A private dockerd.
mkdir -p "$work/docker"; echo '{}' > "$work/docker/daemon.json"
dockerd --config-file "$work/docker/daemon.json" --storage-driver=vfs --iptables=false --ip6tables=false \
    --bridge=none --data-root "$work/docker/data" --exec-root "$work/docker/exec" \
    --pidfile "$work/docker/pid" -H "unix://$work/docker/sock" > "$work/docker/log" 2>&1 &
pids+=($!)
export DOCKER_HOST="unix://$work/docker/sock"
for _ in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done

pull() { # image → seconds, starting from an empty local image store
    local ids; ids=$(docker images -aq)
    [[ -n $ids ]] && docker rmi -f $ids >/dev/null 2>&1 || true
    local t; t=$(now); docker pull -q "$1" >/dev/null; elapsed "$t"
}

km=$(free_port); kontain mirror "$km" "$up"
rp=$(free_port); registry proxy "$rp" "http://127.0.0.1:$up"

direct=$(pull "127.0.0.1:$up/bench:latest")
k_cold=$(pull "127.0.0.1:$km/mirror/local/bench:latest")
k_warm=$(pull "127.0.0.1:$km/mirror/local/bench:latest")
r_cold=$(pull "127.0.0.1:$rp/bench:latest")
r_warm=$(pull "127.0.0.1:$rp/bench:latest")

printf '\ndocker pull of a 3 x 20 MB image (seconds; ratio to pulling the upstream directly)\n'
printf '%-34s %8s %8s\n' "" "time" "ratio"
row() { printf '%-34s %8.3f %8.2f\n' "$1" "$2" "$(awk -v a="$2" -v b="$direct" 'BEGIN { print a / b }')"; }
row "upstream directly (baseline)" "$direct"
row "kontain mirror, cold" "$k_cold"
row "kontain mirror, warm" "$k_warm"
row "docker-registry proxy, cold" "$r_cold"
row "docker-registry proxy, warm" "$r_warm"

# Upstream blob GETs under 10 concurrent cold pulls through each cache.
blob_gets() { grep -c 'GET /v2/bench/blobs/sha256' "$work/upstream/log" || true; }
concurrent() { # source-prefix
    local i copies=()
    for i in $(seq 10); do
        skopeo copy -q --src-tls-verify=false "docker://$1/bench:latest" "oci:$work/out-$RANDOM-$i:x" >/dev/null 2>&1 &
        copies+=($!)
    done
    for i in "${copies[@]}"; do wait "$i" || echo "a concurrent pull through $1 failed" >&2; done
}
km2=$(free_port); kontain mirror2 "$km2" "$up"
before=$(blob_gets); concurrent "127.0.0.1:$km2/mirror/local"; k_gets=$(( $(blob_gets) - before ))
rp2=$(free_port); registry proxy2 "$rp2" "http://127.0.0.1:$up"
before=$(blob_gets); concurrent "127.0.0.1:$rp2"; r_gets=$(( $(blob_gets) - before ))
printf '\nupstream blob GETs, 10 concurrent cold pulls of an image with 4 blobs (3 layers + config)\n'
printf '%-34s %8s\n' "kontain mirror" "$k_gets"
printf '%-34s %8s\n' "docker-registry proxy" "$r_gets"

# Time to first byte of a cold blob: kontain streams it as it arrives.
ttfb() { # url → "first total" seconds
    curl -sf -o /dev/null -w '%{time_starttransfer} %{time_total}\n' "$1"
}
layers=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://127.0.0.1:$up/v2/bench/manifests/latest" | python3 -c 'import json,sys; print(" ".join(l["digest"] for l in json.load(sys.stdin)["layers"]))')
first_bytes() { # name label upstream-port
    local name=$1 label=$2; shift 2
    local kp direct=() through=() d
    kp=$(free_port); kontain "ttfb-$name" "$kp" "$1"
    # As a client does: the manifest first (which tells kontain the sizes).
    curl -sf -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        "http://127.0.0.1:$kp/v2/mirror/local/bench/manifests/latest"
    for d in $layers; do
        direct+=("$(ttfb "http://127.0.0.1:$1/v2/bench/blobs/$d")")
        through+=("$(ttfb "http://127.0.0.1:$kp/v2/mirror/local/bench/blobs/$d")")
    done
    local df dt kf kt
    df=$(printf '%s\n' "${direct[@]}" | cut -d' ' -f1 | median)
    dt=$(printf '%s\n' "${direct[@]}" | cut -d' ' -f2 | median)
    kf=$(printf '%s\n' "${through[@]}" | cut -d' ' -f1 | median)
    kt=$(printf '%s\n' "${through[@]}" | cut -d' ' -f2 | median)
    printf '%-26s %9.4f %9.4f %7.2f %9.4f %9.4f %7.2f\n' "$label" "$df" "$kf" \
        "$(awk -v a="$kf" -v b="$df" 'BEGIN { print a / b }')" "$dt" "$kt" \
        "$(awk -v a="$kt" -v b="$dt" 'BEGIN { print a / b }')"
}
lp=$(free_port)
python3 "$root/bench/latency.py" "$lp" "$up" 50 & pids+=($!)
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$lp/v2/" && break; sleep 0.1; done
printf '\ncold 20 MB blob through kontain vs from the upstream directly (seconds, median of 3 layers)\n'
printf '%-26s %9s %9s %7s %9s %9s %7s\n' "" "1st byte" "kontain" "ratio" "all" "kontain" "ratio"
first_bytes near "loopback" "$up"
first_bytes far "50 ms away" "$lp"
