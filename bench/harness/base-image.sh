#!/usr/bin/env bash
# Makes the busybox base image from Debian's busybox-static (/bin/busybox): a root filesystem
# directory (for `kiln import`) and an OCI image layout (for `skopeo copy` to a registry, where
# peers pull it from).
#
#   bench/harness/base-image.sh OUTDIR      → OUTDIR/rootfs/, OUTDIR/oci/ (tag "latest")
set -euo pipefail
OUT=${1:?usage: base-image.sh OUTDIR}
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "base-image.sh: $BUSYBOX missing (apt-get install busybox-static)" >&2; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT/rootfs"/{bin,etc,tmp,root,usr/bin,usr/sbin,sbin} "$OUT/oci/blobs/sha256"
R="$OUT/rootfs"
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
chmod 1777 "$R/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv/app:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' > "$R/etc/group"

# OCI layout: one gzip layer, a config, a manifest, index.json. Fixed mtimes keep digests stable.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$R" -cf "$OUT/layer.tar" .
diff_id=$(sha256sum "$OUT/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$OUT/layer.tar" > "$OUT/layer.tar.gz"
layer=$(sha256sum "$OUT/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$OUT/layer.tar.gz")
mv "$OUT/layer.tar.gz" "$OUT/oci/blobs/sha256/$layer"
rm "$OUT/layer.tar"
arch=$(case "$(uname -m)" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"bench/harness/base-image.sh: busybox-static rootfs"}]}' \
  "$arch" "$diff_id" > "$OUT/config.json"
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
echo "base image: rootfs $R, OCI layout $OUT/oci (manifest sha256:$manifest)"
