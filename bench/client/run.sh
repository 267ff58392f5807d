#!/usr/bin/env bash
# Registry client benchmark: kiln's client against `skopeo copy`, same images, same registry
# (Debian's docker-registry on 127.0.0.1), same run. Push = OCI layout dir -> registry,
# pull = registry -> OCI layout dir. Each measurement pushes to a fresh repository or pulls
# into a fresh directory. Prints medians and kiln/skopeo ratios (< 1 means kiln is faster).
#
#   bench/client/run.sh [REPS]      (default 3; images are generated once in $BENCH_DATA)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${1:-3}
DATA=${BENCH_DATA:-/tmp/kiln-bench-client}
BIG_BYTES=${BIG_BYTES:-1073741824}
MANY=${MANY:-2000}
mkdir -p "$DATA"

cargo build -q --release -p kiln-oci --example registry_bench
BIN=target/release/examples/registry_bench

[ -f "$DATA/big/index.json" ] || { echo "generating 1 GB layer image..."; rm -rf "$DATA/big"; $BIN gen-big "$DATA/big" "$BIG_BYTES"; }
[ -f "$DATA/many/index.json" ] || { echo "generating $MANY-layer image..."; rm -rf "$DATA/many"; $BIN gen-many "$DATA/many" "$MANY"; }

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/storage
http:
  addr: 127.0.0.1:$PORT
YAML
/usr/bin/docker-registry serve "$WORK/config.yml" >/dev/null 2>&1 &
REG_PID=$!
trap 'kill $REG_PID 2>/dev/null; wait $REG_PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
REG=127.0.0.1:$PORT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# Seed repositories the pulls read from (the registry stores the same bytes whoever pushes;
# kiln's client does it because skopeo takes ~10 minutes for the 2,000-layer image here).
for img in big many; do $BIN push "$DATA/$img" "$REG/seed/$img:latest" >/dev/null; done

declare -A RESULT
for img in big many; do
  for tool in kiln skopeo; do
    for op in push pull; do
      times=()
      for i in $(seq "$REPS"); do
        repo="$tool-$op-$img-$i"
        out="$WORK/out-$repo"
        t0=$(now)
        case "$tool/$op" in
          kiln/push)   $BIN push "$DATA/$img" "$REG/$repo:latest" >/dev/null ;;
          skopeo/push) skopeo copy -q --dest-tls-verify=false "oci:$DATA/$img:latest" "docker://$REG/$repo:latest" ;;
          kiln/pull)   $BIN pull "$REG/seed/$img:latest" "$out" >/dev/null ;;
          skopeo/pull) skopeo copy -q --src-tls-verify=false "docker://$REG/seed/$img:latest" "oci:$out:latest" ;;
        esac
        t1=$(now)
        rm -rf "$out"
        times+=("$(echo "$t1 - $t0" | bc -l)")
        echo "  $img $tool $op #$i: ${times[-1]} s" >&2
      done
      RESULT[$img/$tool/$op]=$(printf '%s\n' "${times[@]}" | median)
    done
  done
done

printf '%-6s %-5s %10s %10s %8s\n' image op kiln_s skopeo_s ratio
for img in big many; do
  for op in push pull; do
    k=${RESULT[$img/kiln/$op]}; s=${RESULT[$img/skopeo/$op]}
    printf '%-6s %-5s %10.3f %10.3f %8.2f\n' "$img" "$op" "$k" "$s" "$(echo "$k / $s" | bc -l)"
  done
done
