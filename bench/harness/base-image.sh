#!/usr/bin/env bash
# Makes the base image every tool builds FROM: an OCI image layout (for `skopeo copy` to the
# bench registry, where every tool pulls it from) and, on request, a root filesystem directory
# (for `kiln import`, KILN_BASE_FROM=import).
#
#   bench/harness/base-image.sh OUTDIR [busybox|debian]   → OUTDIR/oci/ (tag "latest"), OUTDIR/rootfs.tar
#
# busybox: Debian's busybox-static (/bin/busybox) and its applets (the small workload).
# debian:  Debian 12 made by `debootstrap --variant=minbase` (the realistic workload). The
#          rootfs tarball is made once and cached in $KILN_BENCH_CACHE (default
#          /var/cache/kiln-bench), so a rerun fetches nothing; delete it to make a new one.
#          DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
# Fixed mtimes, sorted entries and numeric owners keep the layer's digest stable across runs.
set -euo pipefail
OUT=${1:?usage: base-image.sh OUTDIR [busybox|debian]}
KIND=${2:-busybox}
CACHE=${KILN_BENCH_CACHE:-/var/cache/kiln-bench}
EPOCH=1700000000
rm -rf "$OUT"; mkdir -p "$OUT/oci/blobs/sha256"
TAR=$OUT/rootfs.tar

case "$KIND" in
  busybox)
    BUSYBOX=${BUSYBOX:-/bin/busybox}
    [ -x "$BUSYBOX" ] || { echo "base-image.sh: $BUSYBOX missing (apt-get install busybox-static)" >&2; exit 1; }
    R=$OUT/busybox-rootfs
    mkdir -p "$R"/{bin,etc,tmp,root,usr/bin,usr/sbin,sbin}
    cp "$BUSYBOX" "$R/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
      [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
    done
    chmod 1777 "$R/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv/app:/bin/sh\n' > "$R/etc/passwd"
    printf 'root:x:0:\napp:x:1000:\n' > "$R/etc/group"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$R" -cf "$TAR" .
    rm -rf "$R"
    created_by="bench/harness/base-image.sh: busybox-static rootfs"
    ;;
  debian)
    cached=$CACHE/debian-bookworm-minbase.tar
    if [ ! -s "$cached" ]; then
      command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
      mkdir -p "$CACHE"
      tmp=$CACHE/debootstrap.$$
      rm -rf "$tmp"
      echo "base-image.sh: debootstrap --variant=minbase bookworm (once; cached as $cached)" >&2
      debootstrap --variant=minbase bookworm "$tmp" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
      # What an image does not carry: downloaded packages, apt lists, logs, device nodes.
      rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/var/log/* \
        "$tmp"/dev/* "$tmp"/proc/* "$tmp"/sys/* "$tmp"/run/* "$tmp"/tmp/*
      printf 'app:x:1000:1000:app:/srv/app:/bin/sh\n' >> "$tmp/etc/passwd"
      printf 'app:x:1000:\n' >> "$tmp/etc/group"
      tar --sort=name --clamp-mtime --mtime=@$EPOCH --numeric-owner -C "$tmp" -cf "$cached.part" .
      mv "$cached.part" "$cached"
      rm -rf "$tmp"
    fi
    cp "$cached" "$TAR"
    created_by="bench/harness/base-image.sh: debootstrap --variant=minbase bookworm"
    ;;
  *) echo "base-image.sh: the base is busybox or debian, not $KIND" >&2; exit 2 ;;
esac

# OCI layout: one gzip layer, a config, a manifest, index.json.
diff_id=$(sha256sum "$TAR" | cut -d' ' -f1)
gzip -n -6 -c "$TAR" > "$OUT/layer.tar.gz"
layer=$(sha256sum "$OUT/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$OUT/layer.tar.gz")
mv "$OUT/layer.tar.gz" "$OUT/oci/blobs/sha256/$layer"
arch=$(case "$(uname -m)" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"%s"}]}' \
  "$arch" "$diff_id" "$created_by" > "$OUT/config.json"
config=$(sha256sum "$OUT/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$OUT/config.json")
mv "$OUT/config.json" "$OUT/oci/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$OUT/manifest.json"
manifest=$(sha256sum "$OUT/manifest.json" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$OUT/manifest.json")
mv "$OUT/manifest.json" "$OUT/oci/blobs/sha256/$manifest"
printf '{"imageLayoutVersion":"1.0.0"}' > "$OUT/oci/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
  "$manifest" "$manifest_size" > "$OUT/oci/index.json"
echo "base image ($KIND): OCI layout $OUT/oci (manifest sha256:$manifest, layer $layer_size bytes), rootfs tar $TAR"
