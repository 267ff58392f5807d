#!/usr/bin/env bash
# Builds kiln's own image with kiln: a Debian 12 rootfs from debootstrap (minbase, with uidmap
# and ca-certificates) imported as kiln-base:bookworm, then deploy/Dockerfile with the kiln
# binary. Run as root (debootstrap, kiln import).
#
#   deploy/build-image.sh OUTPUT [KILN_BIN]
#     OUTPUT    a kiln --output value, e.g. type=image,name=registry.example/kiln:1,push=true
#               or type=oci,dest=kiln.tar
#     KILN_BIN  the binary to ship (default: target/release/kiln)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT=${1:?usage: deploy/build-image.sh OUTPUT [KILN_BIN]}
KILN=${2:-$REPO/target/release/kiln}
[ -x "$KILN" ] || { echo "no kiln binary at $KILN (cargo build --release -p kiln)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
debootstrap --variant=minbase --include=uidmap,ca-certificates bookworm "$WORK/rootfs" \
  "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$WORK/rootfs/var/cache/apt/archives" "$WORK/rootfs/var/lib/apt/lists"
"$KILN" import "$WORK/rootfs" -t kiln-base:bookworm
mkdir "$WORK/ctx"
cp "$REPO/deploy/Dockerfile" "$KILN" "$WORK/ctx/"
[ "$(basename "$KILN")" = kiln ] || mv "$WORK/ctx/$(basename "$KILN")" "$WORK/ctx/kiln"
"$KILN" build --frontend dockerfile.v0 --local context="$WORK/ctx" --local dockerfile="$WORK/ctx" \
  --output "$OUTPUT"
