#!/usr/bin/env bash
# Rootless benchmark: the examples/ build (target test, busybox base imported, no registry)
# in each of kiln's modes, same machine, same run, three scenarios each:
#   cold       empty state dir
#   no-change  the same build again on that state
#   one-file   one source file changed, then built again
# Modes: root (host), rootless-userns (an ordinary user with subordinate ids, host),
# podman-userns and podman-chroot (kiln as root in `podman run` with no options, auto isolation
# and KILN_ISOLATION=chroot), and buildah rootless (`buildah bud` as the same ordinary user)
# when buildah runs. Run as root (it creates the user `kilnbench`, removed at the end).
#
#   bench/rootless/run.sh            KILN_BIN=path/to/kiln (default: target/release/kiln,
#                                    else target/debug/kiln)   RUNS=N (default 1)
#                                    SKIP_BUILDAH=1 (leave buildah out)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
KILN=${KILN_BIN:-}
if [ -z "$KILN" ]; then
  for k in "${CARGO_TARGET_DIR:-$REPO/target}/release/kiln" "${CARGO_TARGET_DIR:-$REPO/target}/debug/kiln"; do
    [ -x "$k" ] && { KILN=$k; break; }
  done
fi
[ -x "${KILN:-}" ] || { echo "no kiln binary: set KILN_BIN or cargo build -p kiln" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (creates a test user; root mode)" >&2; exit 1; }
RUNS=${RUNS:-1}
EPOCH=1700000000
WORK=$(mktemp -d /tmp/kiln-bench-rootless.XXXXXX)
chmod 755 "$WORK"
USER_NAME=kilnbench
cleanup() { userdel "$USER_NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

# podman's settings for this machine kind (as bench/run writes them): runc, cgroupfs, and
# default ulimits no higher than this process's hard limits (runc cannot raise them).
limits=()
pid_max=$(cat /proc/sys/kernel/pid_max)
for lim in nofile:n nproc:u; do
  hard=$(ulimit -H"${lim#*:}")
  [ "${lim%:*}" = nproc ] && { [ "$hard" = unlimited ] || ((hard > pid_max)); } && hard=$pid_max
  [ "$hard" = unlimited ] || limits+=("\"${lim%:*}=$hard:$hard\"")
done
export CONTAINERS_CONF=$WORK/containers.conf
{ cat "$REPO/crates/kiln-test-env/containers.conf"
  if ((${#limits[@]})); then
    printf '\n[containers]\ndefault_ulimits = [%s]\n' "$(IFS=,; echo "${limits[*]}")"
  fi
} >"$CONTAINERS_CONF"

now() { date +%s.%N; }

busybox_tree() {  # DIR
  mkdir -p "$1/bin" "$1/etc" "$1/tmp"
  cp /bin/busybox "$1/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$1/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n' > "$1/etc/passwd"
  printf 'root:x:0:\nwww-data:x:33:\n' > "$1/etc/group"
}

# The scenarios, as one shell script any mode runs: KILN, STATE (a new dir each run: a
# rootless state holds files of subordinate ids its user cannot delete), APP, BASE and
# BUILD_FLAGS set.
cat > "$WORK/scenarios.sh" <<'SH'
#!/bin/sh
set -e
export SOURCE_DATE_EPOCH=1700000000
# /proc/uptime: 0.01 s, also where date has no %N (busybox in the podman rootfs).
t() { cut -d' ' -f1 /proc/uptime; }
build() {
  $KILN --root "$STATE" build --frontend dockerfile.v0 --local context="$APP" --local dockerfile="$APP" \
    --opt target=test --progress plain --output type=oci,dest="$STATE.tar" $BUILD_FLAGS > "$STATE.log" 2>&1
}
$KILN --root "$STATE" import "$BASE" -t busybox:latest > /dev/null 2>&1
a=$(t); build; b=$(t); build; c=$(t)
echo "// changed $(date +%s%N)" >> "$APP/src/lib/Greeting.php"
build; d=$(t)
echo "$a $b $c $d" | awk '{printf "cold %.2f s   no-change %.2f s   one-file %.2f s\n", $2-$1, $3-$2, $4-$3}'
SH
chmod 755 "$WORK/scenarios.sh"

fresh_app() { rm -rf "$1"; cp -a "$REPO/examples" "$1"; }

# The user for the rootless modes.
userdel "$USER_NAME" >/dev/null 2>&1 || true
useradd --no-create-home --home-dir "$WORK/home" --shell /bin/sh "$USER_NAME"
mkdir -p "$WORK/home"; chown "$USER_NAME:" "$WORK/home"
grep -q "^$USER_NAME:" /etc/subuid || usermod --add-subuids 3100000-3165535 --add-subgids 3100000-3165535 "$USER_NAME"
busybox_tree "$WORK/busybox"

# The podman rootfs: busybox, kiln and the libraries it links, the scenarios, the example.
ROOTFS=$WORK/podman-rootfs
busybox_tree "$ROOTFS"
chmod 1777 "$ROOTFS/tmp"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/root" "$ROOTFS/var/tmp"
cp "$KILN" "$ROOTFS/usr/local/bin/kiln"
for lib in $(ldd "$KILN" | grep -o '/[^ ]*'); do mkdir -p "$ROOTFS$(dirname "$lib")"; cp "$lib" "$ROOTFS$lib"; done
busybox_tree "$ROOTFS/busybox"
cp "$WORK/scenarios.sh" "$ROOTFS/scenarios.sh"

row() {  # MODE RESULT
  printf '%-18s %s\n' "$1" "$2" | tee -a "$WORK/table.txt"
}

for run in $(seq "$RUNS"); do
  fresh_app "$WORK/app-root"
  row root "$(KILN=$KILN STATE=$WORK/state-root-$run APP=$WORK/app-root BASE=$WORK/busybox \
    BUILD_FLAGS='' "$WORK/scenarios.sh" || echo failed)"

  fresh_app "$WORK/app-user"; chown -R "$USER_NAME:" "$WORK/app-user"
  cp "$KILN" "$WORK/kiln"; chmod 755 "$WORK/kiln"
  row rootless-userns "$(setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups -- \
    env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME="$WORK/home" KILN=$WORK/kiln STATE=$WORK/home/state-$run \
    APP=$WORK/app-user BASE=$WORK/busybox BUILD_FLAGS='' "$WORK/scenarios.sh" || echo failed)"

  for iso in auto chroot; do
    fresh_app "$ROOTFS/app"
    name=podman-userns; [ $iso = chroot ] && name=podman-chroot
    row "$name" "$(podman run --rm --network=none -e KILN_ISOLATION=$iso -e KILN=kiln \
      -e STATE=/var/lib/kiln-bench-$iso-$run -e APP=/app -e BASE=/busybox \
      -e 'BUILD_FLAGS=--network host --allow network.host' \
      --rootfs "$ROOTFS" /scenarios.sh 2>&1 | tail -1 || echo failed)"
  done

  if [ -z "${SKIP_BUILDAH:-}" ] && command -v buildah >/dev/null; then
    fresh_app "$WORK/app-buildah"; chown -R "$USER_NAME:" "$WORK/app-buildah"
    cat > "$WORK/buildah.sh" <<'SH'
#!/bin/sh
set -e
t() { date +%s.%N; }
cd "$HOME"
mkdir -p "$XDG_RUNTIME_DIR"
ctr=$(buildah from scratch)
buildah copy "$ctr" "$BASE" / >/dev/null
buildah commit -q "$ctr" localhost/busybox:latest >/dev/null
buildah rm "$ctr" >/dev/null
b() { buildah bud --layers -q --build-arg BASE_IMAGE=localhost/busybox:latest --target test -f "$APP/Dockerfile" "$APP" >/dev/null 2>&1; }
a=$(t); b; x=$(t); b; c=$(t)
echo "// changed $(date +%s%N)" >> "$APP/src/lib/Greeting.php"
b; d=$(t)
echo "$a $x $c $d" | awk '{printf "cold %.2f s   no-change %.2f s   one-file %.2f s\n", $2-$1, $3-$2, $4-$3}'
SH
    chmod 755 "$WORK/buildah.sh"
    row buildah-rootless "$(setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups -- \
      env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME="$WORK/home" XDG_RUNTIME_DIR="$WORK/home/run" \
      APP=$WORK/app-buildah BASE=$WORK/busybox "$WORK/buildah.sh" || echo failed)"
  fi
done
echo "kiln: $KILN ($("$KILN" --version))"
