#!/usr/bin/env bash
# Benchmark kiln's registry against Debian's docker-registry (CNCF distribution 2.8) in the
# same run, with the same load client (load.rs, release build). Writes results/*.jsonl and
# prints a summary table. Usage: bench/registry/run.sh [--quick]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ws="$(cd "$here/../.." && pwd)"
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

cargo build --release -p kiln-registry --example registry-load --manifest-path "$ws/Cargo.toml" >&2
load="$ws/target/release/examples/registry-load"
distribution=/usr/bin/docker-registry
[[ -x $distribution ]] || { echo "docker-registry is not installed (apt install docker-registry)" >&2; exit 1; }

work="$(mktemp -d /var/tmp/kiln-registry-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do curl -sf "$1/v2/" >/dev/null && return 0; sleep 0.1; done; echo "$1 did not start" >&2; exit 1; }

if (( quick )); then
    args=(--large-mb 256 --small 1000 --manifest-reqs 5000)
else
    args=(--large-mb 1024 --small 5000 --manifest-reqs 20000)
fi

out="$here/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
mkdir -p "$here/results"

# Reference: what the disk does for 1 GiB written with fdatasync, then read back.
dd if=/dev/zero of="$work/dd" bs=1M count=1024 conv=fdatasync 2>&1 | tail -1 | sed 's/^/disk write: /' >&2
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
dd if="$work/dd" of=/dev/null bs=1M 2>&1 | tail -1 | sed 's/^/disk read (cold): /' >&2
rm -f "$work/dd"

run_distribution() {
    local port; port=$(free_port)
    mkdir -p "$work/dist"
    cat > "$work/dist.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/dist
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
    "$distribution" serve "$work/dist.yml" >"$work/dist.log" 2>&1 &
    pids+=($!)
    wait_up "http://127.0.0.1:$port"
    "$load" run --url "http://127.0.0.1:$port" --label distribution "${args[@]}" | tee -a "$out"
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
    rm -rf "$work/dist"
}

run_kiln() {
    local label=$1; shift
    local port; port=$(free_port)
    RUST_LOG=warn "$load" serve --root "$work/kiln-$label" --addr "127.0.0.1:$port" "$@" >"$work/kiln.log" 2>&1 &
    pids+=($!)
    wait_up "http://127.0.0.1:$port"
    "$load" run --url "http://127.0.0.1:$port" --label "$label" "${args[@]}" | tee -a "$out"
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
    rm -rf "$work/kiln-$label"
}

run_distribution
run_kiln kiln
run_kiln kiln-no-fsync --no-fsync

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["scenario"], {})[r["registry"]] = r
print(f"\n{'scenario':<14} {'registry':<15} {'ops/s':>10} {'MB/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'vs dist':>8}")
for sc, regs in by.items():
    base = regs.get("distribution")
    for name, r in regs.items():
        ratio = ""
        if base and name != "distribution":
            key = "mb_per_sec" if sc.startswith("large") else "ops_per_sec"
            if base[key]:
                ratio = f"{r[key] / base[key]:.2f}x"
        print(f"{sc:<14} {name:<15} {r['ops_per_sec']:>10} {r['mb_per_sec']:>9} {r['p50_ms']:>9} {r['p99_ms']:>9} {ratio:>8}")
PY
echo "raw results: $out" >&2
