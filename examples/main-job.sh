#!/usr/bin/env bash
# kiln's main job, end to end on a fresh machine: a multi-stage build with its layer cache in
# kiln's own registry, as three CI runs would do it —
#   1. cold: nothing cached anywhere; the cache is exported to the registry;
#   2. a new runner (empty state dir) importing the cache, nothing changed;
#   3. a new runner importing the cache after one source file changed.
# Prints a before/after table of wall times, steps run/cached and registry bytes moved.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ "$(id -u)" != 0 ]; then
  echo "main-job.sh runs containers (namespaces, overlayfs): run it as root" >&2
  exit 1
fi
bash .ci/install
cargo build --release -q -p kiln
kiln=$repo/target/release/kiln

work=$(mktemp -d /tmp/kiln-main-job.XXXXXX)
registry_pid=
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# kiln's registry on a free port; it prints the address it bound.
"$kiln" registry serve --addr 127.0.0.1:0 --root "$work/registry" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
  grep -q 'listening on' "$work/registry.log" 2>/dev/null && break
  sleep 0.1
done
reg=$(sed -n 's|.*listening on http://||p' "$work/registry.log" | head -1)
[ -n "$reg" ] || { echo "kiln registry did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
echo "kiln registry at $reg"

# The base image: Debian's static busybox as a root filesystem, pushed to the registry.
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" "$work/base"
cp /bin/busybox "$work/rootfs/bin/"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$work/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$work/rootfs/etc/passwd"
printf 'root:x:0:\n' >"$work/rootfs/etc/group"
"$kiln" --root "$work/seed" import "$work/rootfs" -t busybox:latest >/dev/null
echo 'FROM busybox:latest' >"$work/base/Dockerfile"
"$kiln" --root "$work/seed" build "$work/base" --progress quiet \
  -o "type=image,name=$reg/base/busybox:1,push=true" >/dev/null 2>&1

cp -a examples "$work/app"
cd "$work/app"

# The pipeline's one command, buildctl's spelling.
build() { # state-dir label
  local start end
  start=$(date +%s.%N)
  "$kiln" --root "$1" build --frontend dockerfile.v0 --local context=. --local dockerfile=. \
    --opt target=test --opt "build-arg:BASE_IMAGE=$reg/base/busybox:1" \
    --output "type=image,name=$reg/app:test,push=true" \
    --export-cache "type=registry,ref=$reg/app:buildcache,mode=max" \
    --import-cache "type=registry,ref=$reg/app:buildcache" \
    --metadata-file "$1.json" --progress plain >"$1.log" 2>&1 || { cat "$1.log"; exit 1; }
  end=$(date +%s.%N)
  jq -r --arg name "$2" --arg wall "$(echo "$end - $start" | bc)" '
    [$name, ($wall | tonumber * 100 | round / 100 | tostring) + " s",
     ([."kiln.steps"[] | select(.status == "run" and .stage != null)] | length | tostring),
     ([."kiln.steps"[] | select(.status == "cached")] | length | tostring),
     (."kiln.bytes_downloaded" | tostring), (."kiln.bytes_uploaded" | tostring),
     ."containerimage.digest"[7:19]] | @tsv' "$1.json" >>"$work/table.tsv"
}

build "$work/runner1" "cold build, cache exported"
build "$work/runner2" "new runner, nothing changed"
echo "// changed by main-job.sh" >>src/lib/Greeting.php
build "$work/runner3" "new runner, one file changed"

echo
{
  printf 'scenario\twall\tsteps run\tcached\tbytes down\tbytes up\timage\n'
  cat "$work/table.tsv"
} | column -t -s $'\t'
echo
echo "The registry holds one cache tag: $(curl -s "http://$reg/v2/app/tags/list")"
