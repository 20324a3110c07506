#!/usr/bin/env bash
# Benchmark of the `ko` generator (not a test: it asserts nothing).
#
# Fixture: a main module importing a second module, published in a file://
# module proxy; a two-platform (amd64 + arm64) busybox base index in a
# loopback docker-registry. Measured in the same run:
#   - kontain, first pull (HEAD of the index): resolve, fetch and check the
#     module, go build for both platforms, layer, store; Go caches empty;
#   - baseline: plain `go build` of the same module for the same two
#     platforms, from an unpacked copy, with empty Go caches too;
#   - a cached pull (the image exists: resolve + lookup, no build).
#
# usage: bench/ko.sh [runs]     (default 3)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
runs=${1:-3}

command -v go >/dev/null || { echo "needs go (apt-get install golang-go)" >&2; exit 1; }
cargo build --release --quiet --bin kontain

# The module proxy and the base image layout.
PYTHONPATH="$root/bench" python3 - "$work" <<'PY'
import json, os, sys, zipfile
from oci_layout import Layout, gzip_layer, tar
work = sys.argv[1]
proxy = os.path.join(work, "proxy")
def publish(module, version, files):
    d = os.path.join(proxy, module, "@v"); os.makedirs(d, exist_ok=True)
    with zipfile.ZipFile(os.path.join(d, version + ".zip"), "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(f"{module}@{version}/{name}", text)
    open(os.path.join(d, version + ".mod"), "w").write(files["go.mod"])
    open(os.path.join(d, version + ".info"), "w").write(json.dumps({"Version": version, "Time": "2026-01-01T00:00:00Z"}))
    open(os.path.join(d, "list"), "a").write(version + "\n")
publish("example.com/greeting", "v1.0.0", {
    "go.mod": "module example.com/greeting\n\ngo 1.19\n",
    "greeting.go": 'package greeting\n\nfunc Hello() string { return "hello from greeting" }\n'})
publish("example.com/hello", "v1.0.0", {
    "go.mod": "module example.com/hello\n\ngo 1.19\n\nrequire example.com/greeting v1.0.0\n",
    "main.go": 'package main\n\nimport (\n\t"fmt"\n\t"net/http"\n\n\t"example.com/greeting"\n)\n\n'
               'func main() { fmt.Println(greeting.Hello(), http.StatusOK) }\n',
    "kodata/message.txt": "hi\n"})

out = Layout(os.path.join(work, "layout"))
layer, diff_id = gzip_layer(tar([("bin", None, 0o755, None), ("bin/busybox", open("/bin/busybox", "rb").read(), 0o755, None)]))
out.tag("latest", out.index([out.image([layer], [diff_id], arch) for arch in ["amd64", "arm64"]]))
PY

up=$(free_port)
start_registry upstream "$up"
skopeo copy -q --all --preserve-digests --dest-tls-verify=false "oci:$work/layout:latest" "docker://127.0.0.1:$up/base:latest"

accept='application/vnd.oci.image.index.v1+json'
# One kontain per run, each with empty storage and empty Go caches.
kontain_cold() {
    local dir="$work/kontain-$1" port
    port=$(free_port)
    kontain_config "$dir" "$up" <<TOML
[go]
proxies = ["file://$work/proxy"]
sumdb = "off"
[generators.ko]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:ko"
grants = ["upstream", "go"]
[generators.ko.settings]
base = "local/base:latest"
TOML
    start_kontain "$dir" "$port"
    local url="http://127.0.0.1:$port/v2/ko/example.com/hello/manifests/v1.0.0"
    local t
    t=$(curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}' "$url")
    echo "$t" >> "$work/cold"
    for _ in $(seq 20); do
        curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}\n' "$url"
    done >> "$work/cached"
}
go_build_cold() {
    local dir="$work/go-$1"
    mkdir -p "$dir/src" "$dir/home"
    (cd "$dir/src" && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('.')" \
        "$work/proxy/example.com/hello/@v/v1.0.0.zip")
    local s
    s=$(now)
    for arch in amd64 arm64; do
        (cd "$dir/src/example.com/hello@v1.0.0" && env -i PATH="$PATH" HOME="$dir/home" GOPATH="$dir/gopath" \
            GOMODCACHE="$dir/mod" GOCACHE="$dir/cache" GOPROXY="file://$work/proxy" GOSUMDB=off \
            GOFLAGS=-mod=mod CGO_ENABLED=0 GOOS=linux GOARCH=$arch \
            go build -trimpath -buildvcs=false -o "$dir/out-$arch" . 2>/dev/null)
    done
    since "$s" >> "$work/baseline"
}
for i in $(seq "$runs"); do
    kontain_cold "$i"
    go_build_cold "$i"
done
ours=$(median < "$work/cold")
base=$(median < "$work/baseline")
cached=$(median < "$work/cached")

printf 'ko: example.com/hello (2 modules) for linux/amd64 + linux/arm64, empty caches (median of %d)\n' "$runs"
printf '%-44s %8.3f s\n' "kontain first pull (HEAD of the index)" "$ours"
printf '%-44s %8.3f s\n' "go build x2 platforms (baseline)" "$base"
printf '%-44s %8.2f\n' "ratio (kontain / baseline)" "$(awk -v a="$ours" -v b="$base" 'BEGIN { print a / b }')"
printf '%-44s %8.1f ms\n' "kontain cached pull (median of $((runs * 20)))" "$(awk -v c="$cached" 'BEGIN { print c * 1000 }')"
