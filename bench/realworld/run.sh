#!/usr/bin/env bash
# Runs kiln over a directory of real-world Dockerfiles and compares with BuildKit.
#
# Usage: bench/realworld/run.sh DIR [OUT]
#   DIR  one sub-directory per Dockerfile: DIR/<name>/Dockerfile. An optional
#        DIR/<name>/build-args file holds NAME=VALUE lines passed as --build-arg
#        (for a FROM that needs an argument with no default).
#   OUT  results directory (default DIR/results-<UTC time>).
#
# Environment:
#   KILN       kiln binary (default: $CARGO_TARGET_DIR/debug/kiln, else target/debug/kiln)
#   BUILDCTL   buildctl binary; with BUILDKIT_HOST set, BuildKit's own `targets`, `lint` and
#              (per target) `outline` subrequests are run too. `lint` and `outline` resolve base
#              images: without a registry for them `outline` fails and `lint` stops early. With no
#              Docker Hub, run any_image_registry.py (here) and name it as a mirror of docker.io,
#              gcr.io, ghcr.io, ... in buildkitd.toml (README.md has the config)
#   PARSER_DIFF=0  skip the parser differential (cargo test ... --test realworld)
#   KILN_REPO  the kiln checkout whose parser test runs (default: two levels above this script)
#
# For every Dockerfile: list its targets (`--call targets,format=json`), lower every named
# target and the default one with `--dry-run` (no image is pulled, nothing runs), lint it
# (`--call check,format=json`), and, with BuildKit, ask the same of buildkitd. Per-file results
# go to OUT/results.tsv, failures in full to OUT/failures.txt, a summary to standard output.
set -u -o pipefail

dir=${1:?usage: run.sh DIR [OUT]}
dir=$(cd "$dir" && pwd)
out=${2:-$dir/results-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
repo=${KILN_REPO:-$(cd "$here/../.." && pwd)}
kiln=${KILN:-${CARGO_TARGET_DIR:-$repo/target}/debug/kiln}
[ -x "$kiln" ] || { echo "run.sh: no kiln binary at $kiln (cargo build -p kiln, or set KILN)" >&2; exit 2; }
command -v jq >/dev/null || { echo "run.sh: needs jq" >&2; exit 2; }
buildctl=${BUILDCTL:-}
if [ -n "${BUILDKIT_HOST:-}" ] && [ -z "$buildctl" ]; then
    buildctl=$(command -v buildctl) || { echo "run.sh: BUILDKIT_HOST is set but no buildctl on PATH (set BUILDCTL)" >&2; exit 2; }
fi
# dry runs need a state dir for nothing but the lock; keep it away from real ones
export KILN_ROOT=$out/kiln-root

tsv=$out/results.tsv
fail=$out/failures.txt
: >"$fail"
printf 'file\ttargets\tlowered\tfailed_targets\tkiln_lint\tbk_targets\tbk_lint\tbk_lowered\tdisagree\n' >"$tsv"

files=0 all_lower=0 some_fail=0 list_fail=0 targets_total=0 lowered_total=0
for d in "$dir"/*/; do
    df=$d/Dockerfile
    [ -f "$df" ] || continue
    name=$(basename "$d")
    files=$((files + 1))
    args=()
    if [ -f "$d/build-args" ]; then
        while IFS= read -r a; do [ -n "$a" ] && args+=(--build-arg "$a"); done <"$d/build-args"
    fi

    # cmdline= keeps BuildKit on its built-in Dockerfile frontend: without it a
    # `# syntax=` line makes it pull that frontend image, which needs Docker Hub.
    bargs=(--opt cmdline=)
    for a in "${args[@]}"; do [ "$a" != --build-arg ] && bargs+=(--opt "build-arg:$a"); done
    bk_lowered=0 disagree=""

    # Targets: named stages plus the default (last) stage, lowered without --target.
    if ! tj=$("$kiln" build "$d" "${args[@]}" --call targets,format=json 2>"$out/err"); then
        list_fail=$((list_fail + 1))
        { echo "== $name: --call targets failed"; cat "$out/err"; } >>"$fail"
        targets=()
        ntargets=0
        nlowered=0
        failed="LIST:$(head -c 200 "$out/err" | tr '\n\t' '  ')"
    else
        # Named stages only (an unnamed stage has no name, or `stage-N` in older kiln output).
        mapfile -t targets < <(jq -r '.targets[] | select((.default // false) | not) | .name // empty' <<<"$tj" | grep -v '^stage-[0-9]*$')
        targets+=("")
        ntargets=${#targets[@]}
        nlowered=0
        failed=""
        for t in "${targets[@]}"; do
            topt=()
            [ -n "$t" ] && topt=(--target "$t")
            kiln_ok=0
            if "$kiln" build "$d" "${args[@]}" "${topt[@]}" --dry-run >/dev/null 2>"$out/err"; then
                nlowered=$((nlowered + 1))
                kiln_ok=1
            else
                { echo "== $name: target '${t:-<default>}'"; cat "$out/err"; } >>"$fail"
                failed+="${t:-<default>}: $(head -c 160 "$out/err" | tr '\n\t' '  ');"
            fi
            if [ -n "$buildctl" ]; then
                # BuildKit's outline subrequest lowers the target's stages (it resolves the
                # base images' configs, so BUILDKIT_HOST's daemon needs a registry for them).
                bopt=()
                [ -n "$t" ] && bopt=(--opt "target=$t")
                bk_ok=0
                if timeout 120 "$buildctl" build --frontend dockerfile.v0 --local context="$d" --local dockerfile="$d" \
                    "${bargs[@]}" "${bopt[@]}" --opt requestid=frontend.outline >/dev/null 2>"$out/bkerr"; then
                    bk_ok=1
                    bk_lowered=$((bk_lowered + 1))
                fi
                if [ "$kiln_ok" != "$bk_ok" ]; then
                    disagree+="${t:-<default>}:kiln=$kiln_ok,buildkit=$bk_ok;"
                    { echo "== $name: target '${t:-<default>}' kiln lowers=$kiln_ok BuildKit outline=$bk_ok"
                      grep -i error "$out/bkerr"; } >>"$fail"
                fi
            fi
        done
    fi
    targets_total=$((targets_total + ntargets))
    lowered_total=$((lowered_total + nlowered))
    if [ "$ntargets" -gt 0 ] && [ "$nlowered" -eq "$ntargets" ]; then
        all_lower=$((all_lower + 1))
    elif [ "$ntargets" -gt 0 ]; then
        some_fail=$((some_fail + 1))
    fi

    lint=$("$kiln" build "$d" "${args[@]}" --call check,format=json 2>/dev/null \
        | jq -r '[.warnings[]? | "\(.ruleName)@\(.location.ranges[0].start.line)"] | join(",")' 2>/dev/null)
    [ -n "$lint" ] || lint="-"

    bkt="-" bkl="-"
    if [ -n "$buildctl" ]; then
        if timeout 120 "$buildctl" build --frontend dockerfile.v0 --local context="$d" --local dockerfile="$d" \
            "${bargs[@]}" --opt requestid=frontend.targets >"$out/bk" 2>"$out/bkerr"; then
            bkt=ok
        else
            bkt="ERR:$(grep -m1 -i 'error' "$out/bkerr" | head -c 200 | tr '\t' ' ')"
            { echo "== $name: BuildKit targets failed"; grep -i error "$out/bkerr"; } >>"$fail"
        fi
        if timeout 120 "$buildctl" build --frontend dockerfile.v0 --local context="$d" --local dockerfile="$d" \
            "${bargs[@]}" --opt requestid=frontend.lint >"$out/bk" 2>"$out/bkerr"; then
            # WARNING: Rule - url / detail / Dockerfile:LINE
            bkl=$(awk '/^WARNING: /{r=$2} /^Dockerfile:[0-9]+$/{ if (r!="") { split($0,a,":"); printf "%s%s@%s", sep, r, a[2]; sep=","; r="" } }' "$out/bk")
            [ -n "$bkl" ] || bkl="-"
        else
            bkl="ERR:$(grep -m1 -i 'error' "$out/bkerr" | head -c 200 | tr '\t' ' ')"
        fi
    fi
    [ -n "$buildctl" ] || bk_lowered="-"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$ntargets" "$nlowered" "${failed:--}" "$lint" "$bkt" "$bkl" "$bk_lowered" "${disagree:--}" >>"$tsv"
done
rm -f "$out/err" "$out/bk" "$out/bkerr"

parser="not run"
if [ "${PARSER_DIFF:-1}" != 0 ]; then
    if (cd "$repo" && KILN_REALWORLD_DIR=$dir cargo test -q -p kiln-dockerfile --test realworld \
        -- --ignored >"$out/parser-test.log" 2>&1); then
        parser="no differences"
    else
        parser="differences or failure, see $out/parser-test.log"
    fi
    [ -f "$dir/parser-diffs.txt" ] && mv "$dir/parser-diffs.txt" "$out/"
fi

echo "kiln:                 $kiln ($("$kiln" --version 2>/dev/null))"
echo "Dockerfiles:          $files"
echo "every target lowers:  $all_lower"
echo "some target fails:    $some_fail"
echo "targets not listed:   $list_fail"
echo "targets lowered:      $lowered_total of $targets_total"
if [ -n "$buildctl" ]; then
    echo "BuildKit rejects:     $(awk -F'\t' 'NR>1 && $6 ~ /^ERR/' "$tsv" | wc -l) (targets subrequest)"
    echo "BuildKit lowers:      $(awk -F'\t' 'NR>1 {s+=$8} END {print s+0}' "$tsv") targets (outline subrequest)"
    echo "lowering disagrees:   $(awk -F'\t' 'NR>1 && $9 != "-"' "$tsv" | wc -l) files"
fi
echo "parser vs BuildKit:   $parser"
echo "results:              $tsv"
