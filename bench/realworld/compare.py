#!/usr/bin/env python3
"""Summarises run.sh results: one or more OUT directories (e.g. a run with an older kiln
and one with the current tree) side by side, then every remaining difference from BuildKit
in the last one.

Usage: compare.py LABEL=OUT [LABEL=OUT ...]
"""
import csv
import sys
from collections import Counter


def load(out):
    with open(f"{out}/results.tsv", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}


def findings(cell):
    """`Rule@line,...` (run.sh's lint columns) as a set; '-' and errors are empty."""
    if not cell or cell == "-" or cell.startswith("ERR"):
        return set()
    return set(x for x in cell.split(",") if x)


def main(args):
    runs = []
    for a in args:
        label, _, out = a.partition("=")
        runs.append((label, load(out)))
    common = sorted(set.intersection(*(set(r) for _, r in runs)))
    print(f"Dockerfiles in every run: {len(common)}\n")
    print("| | " + " | ".join(label for label, _ in runs) + " | BuildKit v0.24 |")
    print("|---|" + "---|" * (len(runs) + 1))
    last = runs[-1][1]

    def row(name, kiln_value, bk_value):
        cells = [str(kiln_value(r)) for _, r in runs]
        print(f"| {name} | " + " | ".join(cells) + f" | {bk_value} |")

    row("files whose targets are listed", lambda r: sum(1 for f in common if r[f]["failed_targets"].startswith("LIST") is False),
        sum(1 for f in common if last[f]["bk_targets"] == "ok"))
    row("files where every target lowers",
        lambda r: sum(1 for f in common if r[f]["targets"] != "0" and r[f]["targets"] == r[f]["lowered"]),
        sum(1 for f in common if last[f]["targets"] != "0" and last[f]["bk_lowered"] == last[f]["targets"]))
    row("targets lowered (named stages + default)",
        lambda r: f'{sum(int(r[f]["lowered"]) for f in common)} of {sum(int(r[f]["targets"]) for f in common)}',
        f'{sum(int(last[f]["bk_lowered"]) for f in common if last[f]["bk_lowered"] != "-")}')
    row("files where kiln and BuildKit disagree on a target",
        lambda r: sum(1 for f in common if r[f]["disagree"] != "-"), "")
    row("files whose lint findings differ from BuildKit's",
        lambda r: sum(1 for f in common if findings(r[f]["kiln_lint"]) != findings(r[f]["bk_lint"])), "")

    print("\nTargets where lowering disagrees (last run):")
    for f in common:
        if last[f]["disagree"] != "-":
            print(f"  {f}: {last[f]['disagree']}")
    print("\nLint differences (last run), as rule@line; + only kiln, - only BuildKit:")
    only_kiln, only_bk = Counter(), Counter()
    for f in common:
        k, b = findings(last[f]["kiln_lint"]), findings(last[f]["bk_lint"])
        if k != b:
            extra = sorted(k - b)
            missing = sorted(b - k)
            print(f"  {f}: " + " ".join([f"+{x}" for x in extra] + [f"-{x}" for x in missing]))
            only_kiln.update(x.split("@")[0] for x in extra)
            only_bk.update(x.split("@")[0] for x in missing)
    print("\nBy rule: only kiln " + dict(only_kiln).__repr__() + "; only BuildKit " + dict(only_bk).__repr__())


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
