#!/usr/bin/env bash
# The fresh-runner build with its cache in three places, on loopback and behind shaped links:
#   s3       type=s3 on a 3-node Garage cluster (replication factor 3)
#   reg-disk type=registry on kiln's registry, local disk
#   reg-s3   type=registry on kiln's registry with --storage s3:// on the same Garage cluster
#
# For each place (loopback, then each link of LINKS), fresh stores are started; a cold runner
# per backend builds examples/ (target test) and exports a mode=max cache under `cold`. Then,
# for two scenarios (`unchanged`: nothing changed; `onefile`: one source file changed), N times
# per backend in alternation, a new runner (an empty state dir holding only the base image)
# builds with --import-cache of the cold cache and --export-cache to a name of its own in the
# same backend, and pushes the image (reg-disk and reg-s3: to that registry; s3: to the
# local-disk registry, which also serves its base image). Each build's CPU time (user+sys of
# kiln and its containers, GNU time) and the bytes it moved are printed; wall time is a hint
# only (the machine is shared; behind a link it is mostly round trips).
#
# Bytes are counted by nftables counters on the output hook of each network namespace involved,
# by TCP port, so each packet is counted once: `kiln_bytes` is every byte between kiln and the
# stores it talks to (Garage's S3 API on node 0, the two registries; both directions), and
# `reg_s3_bytes` is what the reg-s3 registry moved to and from Garage (its own S3 endpoint,
# node 1). Garage's replication between its nodes is in neither.
#
# Links (LINKS, default "200mbit-30ms:200mbit:30 1gbit-10ms:1gbit:10"; "" for loopback only; a space
# separated list of NAME:RATE:RTT_MS) are bench/shaped/link.sh: the stores (Garage, both
# registries) run in the link's network namespace, kiln outside, so every byte between kiln
# and a store crosses the link; the reg-s3 registry reaches Garage inside the namespace (a
# registry fleet sits next to its store).
#
# Everything runs in a private network namespace (unshare -n), the link's inside it.
#
# BACKENDS (default "s3 reg-disk reg-s3") picks some of them.
#
# Usage: bench/cache-s3/run.sh [KILN_BINARY] [N]   (root; garage on PATH or $KILN_GARAGE_BIN)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ws="$(cd "$here/../.." && pwd)"
kiln="${1:-$ws/target/release/kiln}"
n="${2:-3}"
links="${LINKS-200mbit-30ms:200mbit:30 1gbit-10ms:1gbit:10}"
garage="${KILN_GARAGE_BIN:-$(command -v garage || true)}"
linksh="$ws/bench/shaped/link.sh"
[[ -x $kiln ]] || { echo "no kiln binary at $kiln (cargo build --release -p kiln, or pass one)" >&2; exit 1; }
[[ -x $garage ]] || { echo "garage is not installed (bash .ci/install) and KILN_GARAGE_BIN is not set" >&2; exit 1; }
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive number of runs, not '$n'" >&2; exit 2; }
for t in jq bc nft python3 tc; do
    command -v "$t" >/dev/null || { echo "$t is not installed (bash .ci/install)" >&2; exit 1; }
done
[[ -x /usr/bin/time ]] || { echo "GNU time is not installed (bash .ci/install)" >&2; exit 1; }
for l in $links; do
    [[ $l =~ ^[A-Za-z0-9_-]+:[0-9.]+[kmg]?bit:[0-9]+$ ]] ||
        { echo "LINKS: '$l' is not NAME:RATE:RTT_MS (e.g. 1gbit-10ms:1gbit:10)" >&2; exit 2; }
done

if [[ "${KILN_BENCH_IN_NETNS:-}" != 1 ]]; then
    exec env KILN_BENCH_IN_NETNS=1 unshare -n -- "$0" "$kiln" "$n"
fi
ip link set lo up

work="$(mktemp -d /var/tmp/kiln-cache-s3-bench.XXXXXX)"
pids=()
link_name=""
stop_stores() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
    if [[ -n $link_name ]]; then "$linksh" down "$link_name"; link_name=""; fi
}
cleanup() { stop_stores; rm -rf "$work"; }
trap cleanup EXIT

# Port accounting: an nftables table `kiln_bench` with an output-hook chain holding one counter
# per port and direction, in each namespace counted.
count_ports=(3900 5111 5112 3910)
setup_counters() { # [COMMAND PREFIX...] (the namespace to count in)
    "$@" nft add table inet kiln_bench
    "$@" nft add chain inet kiln_bench out '{ type filter hook output priority 0; policy accept; }'
    for p in "${count_ports[@]}"; do
        "$@" nft add rule inet kiln_bench out tcp dport "$p" counter
        "$@" nft add rule inet kiln_bench out tcp sport "$p" counter
    done
}
ns_cmds=() # how to run a command in each counted namespace, as "prefix" strings
port_bytes() { # PORT... → the sum over the counted namespaces
    local total=0 c b p
    for c in "${ns_cmds[@]}"; do
        for p in "$@"; do
            b=$($c nft list chain inet kiln_bench out |
                awk -v p="$p" '$1 == "tcp" && $3 == p { for (i = 1; i < NF; i++) if ($i == "bytes") s += $(i + 1) } END { print s + 0 }')
            total=$((total + b))
        done
    done
    echo "$total"
}

# --- the project, its base image ----------------------------------------------------------
cp -a "$ws/examples" "$work/app-orig"
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
retry() { for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.3; done; "$@"; }

# --- the stores: Garage (3 nodes, replication 3) and two registries, in a namespace ---------
# start_stores ADDR [COMMAND PREFIX...]: client-facing ports bind ADDR; Garage's RPC and its
# other nodes' S3 APIs bind 127.0.0.1 in the same namespace.
start_stores() {
    local addr=$1; shift
    local ns=("$@") d i
    rm -rf "$work/stores"; mkdir -p "$work/stores"
    local secret; secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for i in 0 1 2; do
        d="$work/stores/garage$i"; mkdir -p "$d/meta" "$d/data"
        local api=127.0.0.1; [[ $i == 0 ]] && api=$addr
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
api_bind_addr = "$api:$((3900 + 10 * i))"
root_domain = ".s3.garage.localhost"
TOML
        RUST_LOG=warn "${ns[@]}" "$garage" -c "$d/garage.toml" server >"$d/log" 2>&1 &
        pids+=($!)
    done
    g() { "${ns[@]}" "$garage" -c "$work/stores/garage0/garage.toml" "$@"; }
    local ids=() id
    for i in 0 1 2; do
        retry "${ns[@]}" "$garage" -c "$work/stores/garage$i/garage.toml" node id -q
        ids+=("$("${ns[@]}" "$garage" -c "$work/stores/garage$i/garage.toml" node id -q 2>/dev/null)")
    done
    for id in "${ids[@]:1}"; do retry g node connect "$id"; done
    for id in "${ids[@]}"; do retry g layout assign -z dc1 -c 1G "${id%@*}"; done
    retry g layout apply --version 1
    local keyout; keyout=$(retry g key create bench; g key info bench --show-secret 2>/dev/null || true)
    AWS_ACCESS_KEY_ID=$(grep -o 'GK[0-9a-f]*' <<<"$keyout" | head -1)
    AWS_SECRET_ACCESS_KEY=$(grep -oE '\b[0-9a-f]{64}\b' <<<"$keyout" | head -1)
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    for b in kiln-cache kiln-registry; do
        retry g bucket create "$b"
        retry g bucket allow --read --write --owner "$b" --key bench
    done
    s3="type=s3,bucket=kiln-cache,region=garage,endpoint_url=http://$addr:3900"
    "${ns[@]}" "$kiln" --root "$work/stores/reg-disk" registry serve --addr "$addr:5111" --no-fsync \
        >"$work/stores/reg-disk.log" 2>&1 &
    pids+=($!)
    if [[ " ${backends[*]} " == *" reg-s3 "* ]]; then
        "${ns[@]}" "$kiln" --root "$work/stores/reg-s3" registry serve --addr "$addr:5112" \
            --storage s3://kiln-registry/reg --s3-endpoint http://127.0.0.1:3910 --s3-region garage \
            >"$work/stores/reg-s3.log" 2>&1 &
        pids+=($!)
    fi
    local r
    local regs=(5111); [[ " ${backends[*]} " == *" reg-s3 "* ]] && regs+=(5112)
    for r in "${regs[@]}"; do
        for _ in $(seq 100); do curl -sf "http://$addr:$r/v2/" >/dev/null && break; sleep 0.1; done
        curl -sf "http://$addr:$r/v2/" >/dev/null ||
            { echo "the registry on port $r did not start:" >&2; cat "$work/stores/reg-"*.log >&2; exit 1; }
    done
    for r in "${regs[@]}"; do
        "$kiln" --root "$work/base-state" build "$work/base-ctx" --progress quiet \
            -o "type=image,name=$addr:$r/base/busybox:1,push=true,registry.insecure=true" >/dev/null
    done
}

build() { # BACKEND STATE IMPORT EXPORT [COMMAND PREFIX...]
    local backend=$1 state=$2 from=$3 to=$4 reg; shift 4
    case $backend in reg-s3) reg=$addr:5112 ;; *) reg=$addr:5111 ;; esac
    (cd "$work/app" && "$@" "$kiln" --root "$state" build --frontend dockerfile.v0 \
        --local context=. --local dockerfile=. --opt target=test \
        --opt "build-arg:BASE_IMAGE=$reg/base/busybox:1" --progress plain \
        --metadata-file "$state.json" \
        -o "type=image,name=$reg/app:$backend,push=true,registry.insecure=true" \
        --export-cache "$to,mode=max" --import-cache "$from")
}
cache_ref() { # BACKEND NAME
    case $1 in
        s3) echo "$s3,name=$2" ;;
        reg-disk) echo "type=registry,ref=$addr:5111/app-cache:$2,registry.insecure=true" ;;
        reg-s3) echo "type=registry,ref=$addr:5112/app-cache:$2,registry.insecure=true" ;;
    esac
}

read -r -a backends <<<"${BACKENDS:-s3 reg-disk reg-s3}"
for b in "${backends[@]}"; do
    case $b in s3 | reg-disk | reg-s3) ;; *) echo "BACKENDS: '$b' is not s3, reg-disk or reg-s3" >&2; exit 2 ;; esac
done
out="$work/rows"
: > "$out"
fmt='%-14s %-9s %-8s %3s %7.2f %7.2f %7.2f %10d %12d %4s %6s\n'
printf '%-14s %-9s %-8s %3s %7s %7s %7s %10s %12s %4s %6s\n' \
    place scenario backend run cpu_s user_s wall_s kiln_bytes reg_s3_bytes ran cached
places=(loopback)
for l in $links; do places+=("$l"); done
index=0
for place in "${places[@]}"; do
    if [[ $place == loopback ]]; then
        addr=127.0.0.1; nsp=()
        ns_cmds=("")
        setup_counters
    else
        index=$((index + 1))
        IFS=: read -r lname rate rtt <<<"$place"; place=$lname
        link_name="cache-s3-$$-$index"
        addr=$("$linksh" up "$link_name" "$index" "$rate" "$rtt")
        nsp=("$linksh" exec "$link_name")
        ns_cmds=("" "$linksh exec $link_name")
        setup_counters
        setup_counters "${nsp[@]}"
        "$linksh" check "$link_name" "$index" > "$work/check-$place" 2>&1 || true
        sed "s/^/[$place] /" "$work/check-$place" >&2
    fi
    start_stores "$addr" "${nsp[@]}"
    rm -rf "$work/app"; cp -a "$work/app-orig" "$work/app"
    # Cold runners fill each backend's cache.
    for backend in "${backends[@]}"; do
        ref=$(cache_ref "$backend" cold)
        fresh_state "$work/cold-$backend"
        build "$backend" "$work/cold-$backend" "$ref" "$ref" >"$work/cold.log" 2>&1 ||
            { echo "cold build ($place, $backend) failed:" >&2; cat "$work/cold.log" >&2; exit 1; }
        rm -rf "$work/cold-$backend" "$work/cold-$backend.json"
    done
    for scenario in unchanged onefile; do
        # One source file changes.
        [[ $scenario == onefile ]] && echo '// edited' >> "$work/app/src/lib/Greeting.php"
        for run in $(seq "$n"); do
            for backend in "${backends[@]}"; do
                state="$work/run-$backend-$run"; fresh_state "$state"
                # Import the cold cache; export to a name of this run's own, so that every
                # run starts from the same cache (as every new runner of one pipeline would).
                from=$(cache_ref "$backend" cold); to=$(cache_ref "$backend" "$scenario$run")
                k0=$(port_bytes 3900 5111 5112); r0=$(port_bytes 3910)
                build "$backend" "$state" "$from" "$to" /usr/bin/time -o "$work/time" -f '%U %S %e' \
                    >"$work/err" 2>&1 || { echo "build ($place $scenario $backend) failed:" >&2; cat "$work/err" >&2; exit 1; }
                k1=$(port_bytes 3900 5111 5112); r1=$(port_bytes 3910)
                read -r u s e < "$work/time"
                ran=$(jq '[."kiln.steps"[] | select(.status == "run" and .stage != null)] | length' "$state.json")
                cached=$(jq '[."kiln.steps"[] | select(.status == "cached" and .stage != null)] | length' "$state.json")
                printf "$fmt" "$place" "$scenario" "$backend" "$run" "$(echo "$u + $s" | bc)" "$u" "$e" \
                    "$((k1 - k0))" "$((r1 - r0))" "$ran" "$cached" | tee -a "$out"
                rm -rf "$state" "$state.json"
            done
        done
    done
    stop_stores
    nft delete table inet kiln_bench
done

# Medians per place, scenario and backend, as a markdown table.
echo
echo '| place | scenario | backend | runs | ran / cached | CPU s | kiln bytes | reg→S3 bytes | wall s (hint) |'
echo '|---|---|---|---|---|---|---|---|---|'
median() { sort -g | awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; print m }'; }
for place in $(awk '{ print $1 }' "$out" | uniq); do
    for scenario in unchanged onefile; do
        for backend in "${backends[@]}"; do
            rows=$(awk -v p="$place" -v s="$scenario" -v b="$backend" '$1 == p && $2 == s && $3 == b' "$out")
            [[ -n $rows ]] || continue
            printf '| %s | %s | %s | %d | %s / %s | %.2f | %d | %d | %.2f |\n' "$place" "$scenario" "$backend" \
                "$(wc -l <<<"$rows")" "$(awk '{ print $10 }' <<<"$rows" | median)" \
                "$(awk '{ print $11 }' <<<"$rows" | median)" "$(awk '{ print $5 }' <<<"$rows" | median)" \
                "$(awk '{ print $8 }' <<<"$rows" | median)" "$(awk '{ print $9 }' <<<"$rows" | median)" \
                "$(awk '{ print $7 }' <<<"$rows" | median)"
        done
    done
done
