#!/usr/bin/env python3
"""Turns bench/run's measurements (JSON lines) into one table with kiln/peer ratios, and
writes the same as a JSON document.

    table.py RESULTS.jsonl OUT.json
"""
import json
import sys


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def num(v, fmt):
    return "-" if v is None else format(v, fmt)


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    meta = rows[0] if rows and rows[0].get("kind") == "meta" else {}
    rows = [r for r in rows if r.get("kind") != "meta"]
    scenarios = []
    for r in rows:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    tools = []
    for r in rows:
        if r["tool"] not in tools:
            tools.append(r["tool"])
    by = {(r["scenario"], r["tool"]): r for r in rows}
    peers = [t for t in tools if t != "kiln"]
    head = ["scenario", "tool", "wall s", "cpu s", "peak MiB", "down", "up", "run/cached", "status"]
    head += [f"kiln/{p} wall" for p in peers]
    lines = [head]
    for s in scenarios:
        for t in tools:
            r = by.get((s, t))
            if r is None:
                continue
            ok = r["status"] == "ok"
            steps = "-" if r.get("steps_run") is None else f"{r['steps_run']}/{r.get('steps_cached', 0)}"
            line = [
                s, t,
                num(r.get("wall_s") if ok else None, ".2f"),
                num((r.get("user_s") or 0) + (r.get("sys_s") or 0) if ok else None, ".2f"),
                num(r["max_rss_kb"] / 1024 if ok and r.get("max_rss_kb") else None, ".0f"),
                fmt_bytes(r.get("bytes_down")), fmt_bytes(r.get("bytes_up")),
                steps,
                "ok" if ok else f"failed: {r.get('reason', '?')}"[:70],
            ]
            for p in peers:
                k, pr = by.get((s, "kiln")), by.get((s, p))
                if t == "kiln" and k and pr and k["status"] == "ok" and pr["status"] == "ok" and pr["wall_s"]:
                    line.append(f"{k['wall_s'] / pr['wall_s']:.2f}")
                else:
                    line.append("")
            lines.append(line)
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    if meta:
        print(f"bench/run  size={meta.get('size')}  kiln={meta.get('kiln')}  {meta.get('machine', '')}")
    for n, l in enumerate(lines):
        print("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    json.dump({"meta": meta, "results": rows}, open(sys.argv[2], "w"), indent=2)
    print(f"\nratios < 1 mean kiln is faster. JSON: {sys.argv[2]}")


if __name__ == "__main__":
    main()
