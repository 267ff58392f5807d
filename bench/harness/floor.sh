#!/usr/bin/env bash
# The floor of "fresh runner, one source file changed" for bench/run's workload: what any
# builder has to do at the least. Downloads exactly the layers the rerun steps sit on
# (REF: an image of those layers, made by registry.py floor-image) with skopeo, unpacks them in
# order with tar, then does the rerun steps' own work: COPY src/ and bin/, the app stage's RUN,
# COPY tests/, the test stage's RUN (in a chroot of the unpacked tree, as root).
#
#   bench/harness/floor.sh REF DIR WORKLOAD     → last line: {"pull_s":…,"unpack_s":…,"steps_s":…}
#
# Sequential: the download, the unpack and the steps do not overlap (a builder may overlap the
# first two, so it can come in under this floor).
set -euo pipefail
REF=${1:?usage: floor.sh REF DIR WORKLOAD}; DIR=${2:?dir}; W=${3:?workload}
mkdir -p "$DIR/blobs" "$DIR/rootfs"
now() { date +%s.%N; }
t0=$(now)
skopeo copy -q --src-tls-verify=false "docker://$REF" "dir:$DIR/blobs"
t1=$(now)
for digest in $(python3 -c 'import json,sys; [print(l["digest"].split(":")[1]) for l in json.load(open(sys.argv[1]))["layers"]]' "$DIR/blobs/manifest.json"); do
  tar --numeric-owner -xf "$DIR/blobs/$digest" -C "$DIR/rootfs"
done
t2=$(now)
R=$DIR/rootfs
mkdir -p "$R/srv/app"
cp -a "$W/src" "$W/bin" "$R/srv/app/"
chroot "$R" /bin/sh -c 'cd /srv/app && n=$(find . -type f | wc -l) && echo "$n" > FILES'
cp -a "$W/tests" "$R/srv/app/"
chroot "$R" /bin/sh -c 'cd /srv/app && sh tests/run.sh'
t3=$(now)
python3 -c 'import json,sys; a=[float(x) for x in sys.argv[1:]]; print(json.dumps({"pull_s": round(a[1]-a[0], 3), "unpack_s": round(a[2]-a[1], 3), "steps_s": round(a[3]-a[2], 3)}))' "$t0" "$t1" "$t2" "$t3"
