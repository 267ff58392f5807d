#!/bin/sh
# Store benchmark: diff + gzip of a 20,000-file ~200 MB tree and unpacking it back, against
# `tar -c | gzip -1` and `tar -xzf` of the same tree in the same run. Release build; run as
# root so the overlayfs snapshotter is used. Results are recorded in RESULTS.md beside this.
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p kiln-store --example store_bench
exec ./target/release/examples/store_bench "$@"
