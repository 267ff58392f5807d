#!/bin/sh
# Differential check of kiln's Dockerfile answers against BuildKit's own frontend.
#
# For every case crates/kiln-dockerfile/tests/lint/NAME.Dockerfile (and examples/Dockerfile):
#   - lint: the rule names and lines BuildKit's frontend reports for the lint subrequest
#     (`requestid=frontend.lint`) against `kiln build --call check,format=json`;
#   - `--call targets` text, and `--call outline` text for the default target.
# With --update it (re)writes NAME.buildkit, the expected lint results the Rust test
# crates/kiln-dockerfile/tests/lint_parity.rs holds kiln to, so CI needs no BuildKit.
#
# Needs a running buildkitd (BUILDKIT_HOST, default unix:///tmp/e2bk/buildkitd.sock) and
# buildctl on PATH or in $BUILDCTL. Base images are never pulled: the names the cases use
# (busybox, busybox:1.36, golang:1.22) are named contexts pointing at an empty directory.
#
# Usage: bench/lint/buildkit_parity.sh [--update] [KILN_BINARY]
set -eu

update=0
if [ "${1:-}" = "--update" ]; then update=1; shift; fi
root=$(cd "$(dirname "$0")/../.." && pwd)
kiln=${1:-$root/target/debug/kiln}
buildctl=${BUILDCTL:-$(command -v buildctl || echo /work/shared/tools/buildctl)}
export BUILDKIT_HOST=${BUILDKIT_HOST:-unix:///tmp/e2bk/buildkitd.sock}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/empty"

# buildctl against a copy of one Dockerfile, with the frontend options given.
bk() {
    src=$1; shift
    rm -rf "$work/ctx"; mkdir "$work/ctx"
    # A `# syntax=` line would make BuildKit fetch that frontend image; keep the line count.
    sed '1s/^# syntax=.*/#/' "$src" > "$work/ctx/Dockerfile"
    "$buildctl" build --frontend dockerfile.v0 --local context="$work/ctx" \
        --local dockerfile="$work/ctx" --local empty="$work/empty" \
        --opt context:busybox=local:empty --opt context:busybox:1.36=local:empty --opt context:busybox:amd64=local:empty \
        --opt context:golang:1.22=local:empty "$@" 2>&1
}

# "Rule line" per warning in BuildKit's printed lint report, sorted.
bk_lint() {
    bk "$1" --opt requestid=frontend.lint --progress plain |
        awk '/^WARNING: /{r=$2} /^Dockerfile:[0-9]+$/{split($0,a,":"); if(r!=""){print r, a[2]; r=""}}' |
        sort
}

kiln_lint() {
    "$kiln" build -f "$1" "$(dirname "$1")" --call check,format=json 2>/dev/null |
        python3 -c 'import json,sys
for w in json.load(sys.stdin)["warnings"]:
    print(w["ruleName"], w["location"]["ranges"][0]["start"]["line"])' | sort
}

fail=0
total=0
for f in "$root"/crates/kiln-dockerfile/tests/lint/*.Dockerfile "$root/examples/Dockerfile"; do
    total=$((total + 1))
    name=$(basename "$f" .Dockerfile)
    bk_lint "$f" > "$work/bk.lint"
    kiln_lint "$f" > "$work/kiln.lint"
    if [ "$update" = 1 ] && [ "$f" != "$root/examples/Dockerfile" ]; then
        cp "$work/bk.lint" "${f%.Dockerfile}.buildkit"
    fi
    if ! diff -u "$work/bk.lint" "$work/kiln.lint" > "$work/diff"; then
        echo "LINT MISMATCH $name (- BuildKit, + kiln):"; cat "$work/diff"; fail=$((fail + 1))
    fi
    # targets, the default target's outline, and each named stage's outline.
    named=$("$kiln" build -f "$f" "$(dirname "$f")" --call targets,format=json 2>/dev/null |
        python3 -c 'import json,sys
for t in json.load(sys.stdin)["targets"]:
    if "name" in t: print(t["name"])' 2>/dev/null || true)
    for call in targets outline $(for t in $named; do echo "outline:$t"; done); do
        target=${call#outline:}
        if [ "$target" = "$call" ]; then set --; else call=outline; set -- --opt target="$target"; fi
        bk "$f" --opt requestid=frontend.$call "$@" --progress quiet > "$work/bk.$call" || true
        code=0
        if [ $# = 0 ]; then topt=""; else topt="--target=$target"; fi
        "$kiln" build -f "$f" "$(dirname "$f")" $topt --call $call > "$work/kiln.$call" 2>&1 || code=$?
        if grep -q '^error: ' "$work/bk.$call"; then
            # BuildKit refuses the file (e.g. an invalid base name): kiln must refuse it too;
            # the wording of the error is kiln's own.
            if [ "$code" = 0 ]; then
                echo "$call: BuildKit failed but kiln did not on $name"; fail=$((fail + 1))
            fi
        elif ! diff -u "$work/bk.$call" "$work/kiln.$call" > "$work/diff"; then
            echo "$(echo $call | tr a-z A-Z) MISMATCH $name ${topt}:"; cat "$work/diff"; fail=$((fail + 1))
        fi
    done
    echo "$name: $(wc -l < "$work/bk.lint") BuildKit warnings, $(wc -l < "$work/kiln.lint") kiln"
done
echo "$total cases, $fail mismatches"
[ "$fail" = 0 ]
