#!/usr/bin/env bash
# The fresh-runner build with its cache in S3 (type=s3 on a 3-node Garage cluster, replication
# factor 3) beside the same with its cache in kiln's registry (type=registry, local disk).
#
# A cold runner builds examples/ (target test) and exports a mode=max cache to both places;
# then one source file changes and, N times per backend in alternation, a new runner (an
# empty state dir holding only the base image) builds with --import-cache of the cold cache
# and --export-cache to a name of its own in the same backend. Each build's CPU time (user+sys of kiln, GNU time) and the bytes it moved
# are printed; wall time is a hint only (the machine is shared).
#
# Everything runs in a private network namespace (unshare -n): the loopback's byte counter
# then counts only this benchmark's traffic (kiln <-> Garage, kiln <-> registry), the same
# measure for both backends.
#
# Usage: bench/cache-s3/run.sh [KILN_BINARY] [N]   (root; garage on PATH or $KILN_GARAGE_BIN)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ws="$(cd "$here/../.." && pwd)"
kiln="${1:-$ws/target/release/kiln}"
n="${2:-3}"
garage="${KILN_GARAGE_BIN:-$(command -v garage || true)}"
[[ -x $kiln ]] || { echo "no kiln binary at $kiln (cargo build --release -p kiln, or pass one)" >&2; exit 1; }
[[ -x $garage ]] || { echo "garage is not installed (bash .ci/install) and KILN_GARAGE_BIN is not set" >&2; exit 1; }
command -v jq >/dev/null || { echo "jq is not installed (bash .ci/install)" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "GNU time is not installed (bash .ci/install)" >&2; exit 1; }

if [[ "${KILN_BENCH_IN_NETNS:-}" != 1 ]]; then
    exec env KILN_BENCH_IN_NETNS=1 unshare -n -- "$0" "$kiln" "$n"
fi
ip link set lo up

work="$(mktemp -d /var/tmp/kiln-cache-s3-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# --- Garage: three nodes, replication factor 3 -------------------------------------------
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in 0 1 2; do
    d="$work/garage$i"; mkdir -p "$d/meta" "$d/data"
    cat > "$d/garage.toml" <<TOML
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "lmdb"
lmdb_map_size = "1G"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$((3901 + 10 * i))"
rpc_public_addr = "127.0.0.1:$((3901 + 10 * i))"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$((3900 + 10 * i))"
root_domain = ".s3.garage.localhost"
TOML
    RUST_LOG=warn "$garage" -c "$d/garage.toml" server >"$d/log" 2>&1 &
    pids+=($!)
done
g() { "$garage" -c "$work/garage0/garage.toml" "$@"; }
retry() { for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.3; done; "$@"; }
ids=()
for i in 0 1 2; do
    retry "$garage" -c "$work/garage$i/garage.toml" node id -q
    ids+=("$("$garage" -c "$work/garage$i/garage.toml" node id -q 2>/dev/null)")
done
for id in "${ids[@]:1}"; do retry g node connect "$id"; done
for id in "${ids[@]}"; do retry g layout assign -z dc1 -c 1G "${id%@*}"; done
retry g layout apply --version 1
keyout=$(retry g key create bench; g key info bench --show-secret 2>/dev/null || true)
key_id=$(grep -o 'GK[0-9a-f]*' <<<"$keyout" | head -1)
key_secret=$(grep -oE '\b[0-9a-f]{64}\b' <<<"$keyout" | head -1)
retry g bucket create kiln-cache
retry g bucket allow --read --write --owner kiln-cache --key bench
export AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$key_secret"
s3="type=s3,bucket=kiln-cache,region=garage,endpoint_url=http://127.0.0.1:3900"

# --- kiln's registry (local disk) -----------------------------------------------------------
"$kiln" registry serve --addr 127.0.0.1:5111 --no-fsync --root "$work/registry" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:5111/v2/ >/dev/null && break; sleep 0.1; done
reg=127.0.0.1:5111
regcache="type=registry,ref=$reg/app"

# --- the project, its base image ----------------------------------------------------------
cp -a "$ws/examples" "$work/app"
mkdir -p "$work/busybox/bin" "$work/busybox/etc" "$work/busybox/tmp"
cp /bin/busybox "$work/busybox/bin/"
for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$work/busybox/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n' > "$work/busybox/etc/passwd"
printf 'root:x:0:\nwww-data:x:33:\n' > "$work/busybox/etc/group"
fresh_state() {
    SOURCE_DATE_EPOCH=1700000000 "$kiln" --root "$1" import "$work/busybox" -t busybox:latest >/dev/null
}
fresh_state "$work/base-state"
mkdir -p "$work/base-ctx"; echo 'FROM busybox:latest' > "$work/base-ctx/Dockerfile"
"$kiln" --root "$work/base-state" build "$work/base-ctx" --progress quiet \
    -o "type=image,name=$reg/base/busybox:1,push=true" >/dev/null
build() { # STATE IMPORT_FLAG_VALUE EXPORT_FLAG_VALUE IMAGE_TAG [COMMAND PREFIX...]
    local state=$1 from=$2 to=$3 tag=$4; shift 4
    (cd "$work/app" && "$@" "$kiln" --root "$state" build --frontend dockerfile.v0 \
        --local context=. --local dockerfile=. --opt target=test \
        --opt "build-arg:BASE_IMAGE=$reg/base/busybox:1" --progress plain \
        --metadata-file "$state.json" \
        -o "type=image,name=$reg/app:$tag,push=true" \
        --export-cache "$to,mode=max" --import-cache "$from")
}

# Cold runners fill both caches.
fresh_state "$work/cold-s3"; build "$work/cold-s3" "$s3,name=cold" "$s3,name=cold" s3 >"$work/cold-s3.log" 2>&1 || { cat "$work/cold-s3.log" >&2; exit 1; }
fresh_state "$work/cold-reg"; build "$work/cold-reg" "$regcache:cold" "$regcache:cold" reg >"$work/cold-reg.log" 2>&1 || { cat "$work/cold-reg.log" >&2; exit 1; }

# One source file changes.
echo '// edited' >> "$work/app/src/lib/Greeting.php"

# /proc/net/dev is the reader's namespace's (sysfs would show the host's).
lo_bytes() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }
printf '%-9s %3s %9s %9s %9s %12s %6s %6s\n' backend run cpu_s user_s wall_s lo_bytes ran cached
for run in $(seq "$n"); do
    for backend in s3 registry; do
        state="$work/run-$backend-$run"; fresh_state "$state"
        # Import the cold cache; export to a name of this run's own, so that every run
        # starts from the same cache (as every new runner of one pipeline would).
        if [[ $backend == s3 ]]; then from="$s3,name=cold"; to="$s3,name=run$run"
        else from="$regcache:cold"; to="$regcache:run$run"; fi
        before=$(lo_bytes)
        build "$state" "$from" "$to" "$backend" /usr/bin/time -o "$work/time" -f '%U %S %e' \
            >"$work/err" 2>&1 || { cat "$work/err" >&2; exit 1; }
        after=$(lo_bytes)
        read -r u s e < "$work/time"
        ran=$(jq '[."kiln.steps"[] | select(.status == "run" and .stage != null)] | length' "$state.json")
        cached=$(jq '[."kiln.steps"[] | select(.status == "cached" and .stage != null)] | length' "$state.json")
        printf '%-9s %3s %9.2f %9.2f %9.2f %12d %6s %6s\n' "$backend" "$run" \
            "$(echo "$u + $s" | bc)" "$u" "$e" "$((after - before))" "$ran" "$cached"
        rm -rf "$state"
    done
done
