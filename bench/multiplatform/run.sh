#!/usr/bin/env bash
# Multi-platform build benchmark: `--platform linux/amd64,linux/arm64` on an amd64 machine,
# the index pushed to a registry, kiln beside BuildKit (buildctl + buildkitd, when on PATH)
# in the same run. Every build is on a fresh runner (a fresh state dir / buildkitd root):
# cold, exporting a registry cache (mode=max), then fresh, another runner importing it.
#
#   bench/multiplatform/run.sh [REPS]      (default 3; medians are reported)
#
# Two Dockerfiles doing the same work per target architecture:
#   emulated  the work runs in the target stage: natively for amd64, under QEMU (binfmt_misc,
#             Debian's qemu-user-static) for arm64;
#   cross     the work runs in a native `FROM --platform=$BUILDPLATFORM` stage once per
#             target architecture (what a cross-compiler does); the target stages only COPY
#             their architecture's output.
# The work: gzip of 800,000 lines and 200 short processes (busybox), so both the emulator's
# CPU cost and its per-exec start-up count.
#
# Environment:
#   KILN_BIN=PATH   kiln binary to measure (default: cargo build --release -p kiln)
#   BENCH_OUT=DIR   where results go (default bench/out): multiplatform/results.jsonl, table.txt
#   PEERS=buildctl  set to "" to measure kiln alone
#   SKIP_KILN=1     measure only the peers
# Needs root (containers, binfmt_misc), skopeo, docker-registry, jq; registers Debian's
# qemu-aarch64 binfmt handler with the F flag when it is not (kiln-test-env's multiarch).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
REPS=${1:-3}
PEERS=${PEERS-buildctl}
OUT=${BENCH_OUT:-$REPO/bench/out}/multiplatform
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
mkdir -p "$OUT"
log() { printf '[multiplatform %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "bench/multiplatform: run as root (containers, binfmt_misc)" >&2; exit 1; }
for p in skopeo docker-registry jq; do
  command -v "$p" >/dev/null || { echo "bench/multiplatform: $p is missing: run bash .ci/install" >&2; exit 1; }
done

if [ -n "${SKIP_KILN:-}" ]; then
  :
elif [ -z "${KILN_BIN:-}" ]; then
  (cd "$REPO" && cargo build -q --release -p kiln)
  KILN_BIN=$TARGET_DIR/release/kiln
fi
[ -z "${SKIP_KILN:-}" ] && log "kiln: $KILN_BIN ($("$KILN_BIN" --version 2>/dev/null || echo '?'))"

WORK=$(mktemp -d /var/tmp/kiln-bench-multiplatform.XXXXXX)
REG_PID=""; BK_PID=""
cleanup() {
  [ -n "$BK_PID" ] && { kill "$BK_PID" 2>/dev/null && wait "$BK_PID" 2>/dev/null; } || true
  [ -n "$REG_PID" ] && { kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null; } || true
  grep " $WORK/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- registry and the base index (busybox for amd64 and arm64, made here)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat > "$WORK/registry.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: $REG
YAML
docker-registry serve "$WORK/registry.yml" >/dev/null 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$REG/v2/" >/dev/null && break; sleep 0.1; done
BASE=$(cd "$REPO" && cargo run -q -p kiln-test-env --example busybox_index -- --binfmt "$REG" bench/busybox)
log "base index: $BASE"

# ---- the two workloads
WORKSTEP='seq 1 800000 | gzip -6 | sha256sum > /out/$a.sum \
 && i=0 && while [ $i -lt 200 ]; do echo $i | md5sum >> /out/$a.md5; i=$((i+1)); done'
mkdir -p "$WORK/ctx/emulated" "$WORK/ctx/cross"
cat > "$WORK/ctx/emulated/Dockerfile" <<EOF
ARG BASE
FROM \$BASE
ARG TARGETARCH
RUN mkdir /out && a=\$TARGETARCH && $WORKSTEP
CMD ["cat", "/out/\$TARGETARCH.sum"]
EOF
cat > "$WORK/ctx/cross/Dockerfile" <<EOF
ARG BASE
FROM --platform=\$BUILDPLATFORM \$BASE AS build
RUN mkdir /out && for a in amd64 arm64; do $WORKSTEP; done

FROM \$BASE
ARG TARGETARCH
COPY --from=build /out/\$TARGETARCH.sum /out/\$TARGETARCH.md5 /out/
CMD ["cat", "/out/\$TARGETARCH.sum"]
EOF

# ---- BuildKit: a daemon per build (a fresh runner), plain HTTP to the bench registry
HAVE_BK=0
if [[ " $PEERS " == *" buildctl "* ]]; then
  if command -v buildctl >/dev/null && command -v buildkitd >/dev/null; then HAVE_BK=1
  else log "buildctl/buildkitd not on PATH: kiln alone"; fi
fi
bk_start() { # ROOT
  local root=$1 sock="unix://$1.sock"
  cat > "$1.toml" <<TOML
root = "$root"
[grpc]
  address = ["$sock"]
[worker.oci]
  enabled = true
  snapshotter = "overlayfs"
  networkMode = "host"
[worker.containerd]
  enabled = false
[registry."$REG"]
  http = true
  insecure = true
TOML
  buildkitd --config "$1.toml" >"$1.log" 2>&1 &
  BK_PID=$!
  export BUILDKIT_HOST=$sock
  for _ in $(seq 200); do buildctl debug workers >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "buildkitd did not start: $(tail -n 3 "$1.log")" >&2; return 1
}
bk_stop() { [ -n "$BK_PID" ] && { kill "$BK_PID" 2>/dev/null && wait "$BK_PID" 2>/dev/null; } || true; BK_PID=""; }

# ---- one measured build: sets SECS, or fails. PHASE cold: a fresh state, exporting the
# registry cache (mode=max); fresh: another fresh state (a new runner) importing it.
now() { date +%s.%N; }
SECS=""
build() { # TOOL WORKLOAD REP PHASE
  local tool=$1 wl=$2 rep=$3 phase=$4 ctx=$WORK/ctx/$2 t0 t1 rc=0
  local image=$REG/bench/mp-$tool-$wl:$rep-$phase cache=$REG/bench/mp-$tool-$wl-cache:$rep
  local name=$tool-$wl-$rep-$phase insecure=""
  [ "$tool" = buildctl ] && insecure=,registry.insecure=true
  local cachearg=(--export-cache "type=registry,ref=$cache,mode=max$insecure")
  [ "$phase" = fresh ] && cachearg=(--import-cache "type=registry,ref=$cache$insecure")
  local common=(build --frontend dockerfile.v0 --local "context=$ctx" --local "dockerfile=$ctx"
    --opt platform=linux/amd64,linux/arm64 --opt "build-arg:BASE=$BASE" --progress plain
    --output "type=image,name=$image,push=true$insecure" "${cachearg[@]}")
  case $tool in
    kiln)
      t0=$(now)
      "$KILN_BIN" --root "$WORK/$name" "${common[@]}" >"$WORK/$name.log" 2>&1 || rc=$?
      t1=$(now)
      rm -rf "${WORK:?}/$name" ;;
    buildctl)
      bk_start "$WORK/$name" || { bk_stop; return 1; }
      t0=$(now)
      buildctl "${common[@]}" >"$WORK/$name.log" 2>&1 || rc=$?
      t1=$(now)
      bk_stop
      rm -rf "${WORK:?}/$name" ;;
  esac
  if [ $rc -ne 0 ]; then
    echo "$name failed: $(tail -n 3 "$WORK/$name.log")" >&2; return 1
  fi
  # The result counts only when it is an index of both platforms.
  local got
  got=$(skopeo inspect --tls-verify=false --raw "docker://$image" |
    jq -r '[.manifests[]? | select(.platform.os != "unknown") | .platform.os + "/" + .platform.architecture] | join(",")')
  if [ "$got" != "linux/amd64,linux/arm64" ]; then
    echo "$name pushed platforms [$got], not linux/amd64,linux/arm64" >&2; return 1
  fi
  SECS=$(echo "$t1 - $t0" | bc -l)
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR) print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

TOOLS=(); [ -z "${SKIP_KILN:-}" ] && TOOLS+=(kiln); [ $HAVE_BK = 1 ] && TOOLS+=(buildctl)
[ ${#TOOLS[@]} -gt 0 ] || { echo "bench/multiplatform: nothing to measure" >&2; exit 1; }
declare -A TIMES
SCENARIOS=(emulated/cold emulated/fresh cross/cold cross/fresh)
for rep in $(seq "$REPS"); do
  for wl in emulated cross; do
    for tool in "${TOOLS[@]}"; do   # interleaved: load on the machine hits both alike
      for phase in cold fresh; do
        if build "$tool" "$wl" "$rep" "$phase"; then
          log "$tool $wl $phase #$rep: $SECS s"
          TIMES[$tool/$wl/$phase]+="$SECS "
        else
          TIMES[$tool/$wl/$phase]+=""
          [ "$phase" = cold ] && break   # nothing to import
        fi
      done
    done
  done
done
med() { printf '%s\n' ${TIMES[$1]:-} | median; }

: >"$OUT/results.jsonl"
{
  printf '%-15s %-9s %10s  %s\n' scenario tool median_s runs
  for sc in "${SCENARIOS[@]}"; do
    for tool in "${TOOLS[@]}"; do
      runs=${TIMES[$tool/$sc]:-}
      m=$(med "$tool/$sc")
      printf '%-15s %-9s %10s  %s\n' "$sc" "$tool" "$([ -n "$m" ] && printf '%.2f' "$m" || echo failed)" "$runs"
      jq -nc --arg sc "$sc" --arg tool "$tool" --arg m "${m:-}" --arg runs "$runs" --arg reps "$REPS" \
        '{bench:"multiplatform", workload:($sc|split("/")[0]), phase:($sc|split("/")[1]), tool:$tool,
          median_s:($m|tonumber? // null), runs:($runs|split(" ")|map(select(.!="")|tonumber)),
          reps:($reps|tonumber)}' >>"$OUT/results.jsonl"
    done
  done
  if [ $HAVE_BK = 1 ] && [ -z "${SKIP_KILN:-}" ]; then
    for sc in "${SCENARIOS[@]}"; do
      k=$(med "kiln/$sc"); b=$(med "buildctl/$sc")
      [ -n "$k" ] && [ -n "$b" ] && printf '%-15s kiln/buildctl %.2f\n' "$sc" "$(echo "$k / $b" | bc -l)"
    done
  fi
  for tool in "${TOOLS[@]}"; do
    e=$(med "$tool/emulated/cold"); c=$(med "$tool/cross/cold")
    [ -n "$e" ] && [ -n "$c" ] && printf '%-9s cold cross/emulated %.2f\n' "$tool" "$(echo "$c / $e" | bc -l)"
  done
} | tee "$OUT/table.txt"
