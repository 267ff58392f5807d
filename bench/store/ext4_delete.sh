#!/bin/bash
# ext4: kernel time of creating a tree right after a large deletion, by how the deletion is
# done — what `reclaim_leftovers` at the start of a build used to do (delete a killed build's
# snapshot tree) against what it does now (rename it into snapshots/trash/).
# Usage: bench/store/ext4_delete.sh SRC_TREE [ROUNDS]   (run on the ext4 fs under test, as
# a user who can write to the current dir). Prints user/sys CPU seconds of `cp -a SRC_TREE`.
set -eu
src=$(realpath "$1"); rounds=${2:-2}
work=$(mktemp -d "$PWD/ext4-delete.XXXXXX")
cd "$work"
make_100k() {
  python3 - "$1" <<'PY'
import os, sys
for d in range(1000):
    p = f"{sys.argv[1]}/{d // 100}/{d}"
    os.makedirs(p)
    for f in range(100):
        with open(f"{p}/f{f}.js", "w") as fh:
            fh.write("x" * 200)
PY
  sync
}
create() { /usr/bin/time -f "$1: cp -a of the tree: user %U s, sys %S s, wall %e s" cp -a "$src" "out-$2"; }
for r in $(seq "$rounds"); do
  for mode in delete-then-create rename-then-create; do
    make_100k "big-$r-$mode"; sleep 5
    case $mode in
      delete-then-create) rm -rf "big-$r-$mode"; create "$mode" "$r-$mode" ;;
      rename-then-create) mv "big-$r-$mode" "trash-$r-$mode"; create "$mode" "$r-$mode" ;;
    esac
    # Let the allocator forget before the next round (the window is minutes).
    rm -rf "out-$r-$mode" "trash-$r-$mode"; sleep 120
  done
done
cd / && rm -rf "$work"
