#!/usr/bin/env bash
# Benchmark of the `mirror` generator (not a test: it asserts nothing).
#
# Upstream: Debian's docker-registry on loopback, seeded with a 3 × 20 MB
# image (made by kontain's random generator). Compared in one run:
#   - docker pull straight from the upstream (the baseline),
#   - through kontain's mirror, cold and warm,
#   - through docker-registry in proxy mode (pull-through cache), cold and warm;
# and the number of blob GETs the upstream sees under 10 concurrent cold
# pulls (skopeo) through each cache.
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
