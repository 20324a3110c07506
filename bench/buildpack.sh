#!/usr/bin/env bash
# Benchmark of the `buildpack` generator (not a test: it asserts nothing).
#
# Fixture: the test suite's builder (busybox build/run image, two shell
# buildpacks: one contributes a `shout` tool layer, the other uses it at
# build time and declares the process) in a loopback docker-registry, and a
# local git repository served through a file:// URL template. Measured in
# the same run:
#   - kontain: a pull (HEAD) of a new commit each time: git fetch, detect and
#     build in bubblewrap, export onto the run image, store; the builder's
#     filesystem is unpacked on the first pull only (reported separately);
#   - baseline: the same buildpack scripts run directly in a shell (detect x2,
#     build x2 with the same CNB variables), no sandbox, no export.
#
# usage: bench/buildpack.sh [runs]     (default 5)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
runs=${1:-5}

command -v bwrap >/dev/null || { echo "needs bubblewrap (apt-get install bubblewrap)" >&2; exit 1; }
cargo build --release --quiet --bin kontain

# The buildpacks: the test suite's own scripts (also run by the baseline).
bp="$work/buildpacks"
for name in tool app; do
    mkdir -p "$bp/$name/bin"
    cp "$root/tests/fixtures/buildpacks/$name/detect" "$root/tests/fixtures/buildpacks/$name/build" "$bp/$name/bin/"
done
chmod 755 "$bp"/*/bin/*

PYTHONPATH="$root/bench" python3 - "$work" <<'PY'
import os, sys
from oci_layout import Layout, gzip_layer, tar
work = sys.argv[1]
def layout(name, tars):
    out = Layout(os.path.join(work, name))
    pairs = [gzip_layer(t) for t in tars]
    out.tag("latest", out.image([g for g, _ in pairs], [d for _, d in pairs]))
busybox = open("/bin/busybox", "rb").read()
base = [("bin", None, 0o755, None), ("bin/busybox", busybox, 0o755, None)] + \
       [("bin/" + a, None, 0o777, "busybox") for a in "sh cat echo mkdir tr chmod test printf".split()]
layout("run", [tar(base)])
cnb = [("cnb", None, 0o755, None), ("cnb/buildpacks", None, 0o755, None),
       ("cnb/order.toml", b'[[order]]\n[[order.group]]\nid = "bench/tool"\nversion = "0.1.0"\n[[order.group]]\nid = "bench/app"\nversion = "0.1.0"\n', 0o644, None),
       ("cnb/run.toml", b'[[images]]\nimage = "local/run:latest"\n', 0o644, None)]
for name in ["tool", "app"]:
    d = f"cnb/buildpacks/bench_{name}/0.1.0"
    cnb += [(f"cnb/buildpacks/bench_{name}", None, 0o755, None), (d, None, 0o755, None), (d + "/bin", None, 0o755, None),
            (d + "/buildpack.toml", f'api = "0.10"\n[buildpack]\nid = "bench/{name}"\nversion = "0.1.0"\n'.encode(), 0o644, None)]
    for script in ["detect", "build"]:
        cnb.append((f"{d}/bin/{script}", open(f"{work}/buildpacks/{name}/bin/{script}", "rb").read(), 0o755, None))
layout("builder", [tar(base), tar(cnb)])
PY

up=$(free_port)
start_registry upstream "$up"
for image in run builder; do
    skopeo copy -q --dest-tls-verify=false "oci:$work/$image:latest" "docker://127.0.0.1:$up/$image:latest"
done

repo="$work/git/bench/app"
mkdir -p "$repo"
git -C "$repo" init -q -b main
printf 'hello world\n' > "$repo/message.txt"
printf 'echo "$GREETING: $(shout < message.txt)"\n' > "$repo/run.sh"
commit() { git -C "$repo" -c user.name=b -c user.email=b@b add . && git -C "$repo" -c user.name=b -c user.email=b@b commit -q -m "$1"; }
commit first

port=$(free_port)
kontain_config "$work/kontain" "$up" <<TOML
[buildpack]
git_url = "file://$work/git/{owner}/{repo}"
[generators.buildpack]
budget = { requests = 0, generated_bytes = 0, builds = 0 }
source = "builtin:buildpack"
grants = ["upstream", "buildpack"]
[generators.buildpack.settings]
builder = "local/builder:latest"
TOML
start_kontain "$work/kontain" "$port"
url="http://127.0.0.1:$port/v2/buildpack/bench/app/manifests/main"
accept='application/vnd.oci.image.manifest.v1+json'
first=$(curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}' "$url")
for i in $(seq "$runs"); do
    printf 'run %s\n' "$i" >> "$repo/message.txt"
    commit "run $i"
    curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}\n' "$url"
done > "$work/ours"
cached=$(for _ in $(seq 20); do curl -sf -o /dev/null -I -H "Accept: $accept" -w '%{time_total}\n' "$url"; done | median)

baseline_once() {
    local b="$work/direct" s
    rm -rf "$b"; mkdir -p "$b/app" "$b/layers/bench_tool" "$b/layers/bench_app" "$b/platform" "$b/io"
    cp "$repo/message.txt" "$repo/run.sh" "$b/app/"
    s=$(now)
    (
        cd "$b/app"
        export CNB_PLATFORM_DIR="$b/platform" CNB_BUILD_PLAN_PATH="$b/io/plan.toml"
        CNB_BUILDPACK_DIR="$bp/tool" "$bp/tool/bin/detect" "$b/platform" "$b/io/plan.toml"
        CNB_BUILDPACK_DIR="$bp/app" "$bp/app/bin/detect" "$b/platform" "$b/io/plan.toml"
        CNB_LAYERS_DIR="$b/layers/bench_tool" CNB_BP_PLAN_PATH="$b/io/plan.toml" "$bp/tool/bin/build" "$b/layers/bench_tool" "$b/platform" "$b/io/plan.toml"
        PATH="$b/layers/bench_tool/shout/bin:$PATH" CNB_LAYERS_DIR="$b/layers/bench_app" CNB_BP_PLAN_PATH="$b/io/plan.toml" "$bp/app/bin/build" "$b/layers/bench_app" "$b/platform" "$b/io/plan.toml"
    ) > /dev/null
    since "$s"
}
base=$(for _ in $(seq "$runs"); do baseline_once; done | median)
ours=$(median < "$work/ours")

printf 'buildpack: 2 shell buildpacks on a busybox builder (median of %d new commits)\n' "$runs"
printf '%-48s %8.3f s\n' "kontain pull of a new commit (fetch+detect+build+export)" "$ours"
printf '%-48s %8.3f s\n' "the same scripts run directly in a shell" "$base"
printf '%-48s %8.1f\n' "ratio (kontain / baseline)" "$(awk -v a="$ours" -v b="$base" 'BEGIN { print a / b }')"
printf '%-48s %8.3f s\n' "kontain first pull (also unpacks the builder)" "$first"
printf '%-48s %8.1f ms\n' "kontain cached pull (median of 20)" "$(awk -v c="$cached" 'BEGIN { print c * 1000 }')"
