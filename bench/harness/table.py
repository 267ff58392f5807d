#!/usr/bin/env python3
"""Turns bench/run's measurements (JSON lines, one per command run) into
  - a Markdown summary: one row per scenario (and shaped link), the median wall time of each
    tool over the repetitions, kiln's ratio to each peer, the registry bytes and the floor;
  - a detail table (medians, spread, CPU, peak memory, bytes, steps run/cached, failures);
and writes the rows as one JSON document.

    table.py RESULTS.jsonl OUT.json [OUT.md]
"""
import json
import statistics
import sys

LABELS = {
    "cold": "cold, target=test, push + cache export",
    "warm-unchanged": "warm, nothing changed",
    "warm-one-file": "warm, one source file changed",
    "fresh-unchanged": "fresh runner + registry cache, nothing changed",
    "fresh-one-file": "fresh runner + registry cache, one file changed",
    "fresh-one-file-floor": "  floor: skopeo copy + tar -x of its layers + the rerun steps",
    "registry-bytes": "registry bytes after one cold build (cache + image)",
}
NAMES = {"kiln": "kiln", "buildctl": "BuildKit", "buildah": "buildah", "docker": "dockerd BuildKit"}
TOOL_ORDER = ["kiln", "buildctl", "buildah", "docker"]


def mb(n):
    return "-" if n is None else f"{n / 1e6:.0f}"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def median(rows, key):
    vals = [r[key] for r in rows if r["status"] == "ok" and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def cell(rows, scenario):
    """The summary's text for one tool's rows of one scenario."""
    if not rows:
        return "-"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "failed: " + (rows[-1].get("reason") or "?")[:60].replace("|", "/")
    if scenario == "registry-bytes":
        return f"{mb(median(ok, 'cache_bytes'))} + {mb(median(ok, 'image_bytes'))} MB"
    text = f"{median(ok, 'wall_s'):.2f} s"
    if len(ok) < len(rows):
        text += f" ({len(ok)}/{len(rows)} ok)"
    return text


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    meta = rows[0] if rows and rows[0].get("kind") == "meta" else {}
    rows = [r for r in rows if r.get("kind") != "meta"]
    for r in rows:
        r.setdefault("link", "loopback")
    tools = sorted({r["tool"] for r in rows}, key=lambda t: (TOOL_ORDER.index(t) if t in TOOL_ORDER else 99, t))
    peers = [t for t in tools if t != "kiln"]
    groups = {}
    for r in rows:
        groups.setdefault((r["link"], r["scenario"], r["tool"]), []).append(r)
    links = []
    for r in rows:
        if r["link"] not in links:
            links.append(r["link"])
    order = list(LABELS)
    keys = sorted({(r["link"], r["scenario"]) for r in rows},
                  key=lambda k: (links.index(k[0]), order.index(k[1]) if k[1] in order else 99, k[1]))

    # Markdown summary
    md = []
    if meta:
        md.append(f"bench/run builds, SIZE={meta.get('size')}, medians of {meta.get('reps', 1)} "
                  f"interleaved repetition(s), {meta.get('machine', '')}, {meta.get('date', '')}; "
                  f"kiln = {meta.get('kiln')}")
        md.append("")
    head = ["scenario"] + [NAMES.get(t, t) for t in tools] + [f"kiln/{NAMES.get(p, p)}" for p in peers]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    floors = []
    for link, scenario in keys:
        label = LABELS.get(scenario, scenario)
        if link != "loopback":
            label += f" [{link}]"
        line = [label] + [cell(groups.get((link, scenario, t), []), scenario) for t in tools]
        for p in peers:
            k, pr = groups.get((link, scenario, "kiln"), []), groups.get((link, scenario, p), [])
            if scenario == "registry-bytes":
                kt, pt = median(k, "total_bytes"), median(pr, "total_bytes")
                kc, pc = median(k, "cache_bytes"), median(pr, "cache_bytes")
                ki, pi = median(k, "image_bytes"), median(pr, "image_bytes")
                line.append(f"{kc / pc:.2f} / {ki / pi:.2f}" if kc and pc and ki and pi else "")
            elif scenario == "fresh-one-file-floor":
                line.append("")
            else:
                kw, pw = median(k, "wall_s"), median(pr, "wall_s")
                line.append(f"{kw / pw:.2f}" if kw and pw else "")
        md.append("| " + " | ".join(line) + " |")
        if scenario == "fresh-one-file-floor":
            fl = [median(groups.get((link, scenario, t), []), "wall_s") for t in tools]
            fl = [f for f in fl if f]
            kw = median(groups.get((link, "fresh-one-file", "kiln"), []), "wall_s")
            if fl and kw:
                floors.append(f"{link}: kiln {kw:.2f} s / floor {min(fl):.2f} s (the lowest of the floors "
                              f"measured on each tool's own blobs) = **{kw / min(fl):.2f}** (aim ≤ 1.3)")
    md.append("")
    md.append("Ratios < 1: kiln is faster (registry bytes: kiln's cache / image bytes over the peer's).")
    for f in floors:
        md.append(f"Fresh runner, one file changed, kiln/floor — {f}.")
    floor_rows = [r for r in rows if r["scenario"] == "fresh-one-file-floor" and r["status"] == "ok"]
    if floor_rows:
        md.append("Floor parts (medians, loopback + links): " + "; ".join(
            f"{NAMES.get(t, t)}'s blobs [{link}]: {median(rs, 'layers'):.0f} layers, {mb(median(rs, 'bytes'))} MB, "
            f"pull {median(rs, 'pull_s'):.2f} s + unpack {median(rs, 'unpack_s'):.2f} s + steps {median(rs, 'steps_s'):.2f} s"
            for (link, s, t), rs in groups.items() if s == "fresh-one-file-floor" and any(r["status"] == "ok" for r in rs)))
    summary = "\n".join(md)

    # Detail table
    dhead = ["link", "scenario", "tool", "wall s (median)", "min-max", "cpu s", "peak MiB", "down", "up", "run/cached", "ok", "status"]
    dl = [dhead]
    for link, scenario in keys:
        for t in tools:
            rs = groups.get((link, scenario, t))
            if not rs:
                continue
            ok = [r for r in rs if r["status"] == "ok"]
            walls = [r["wall_s"] for r in ok if r.get("wall_s") is not None]
            cpu = [(r.get("user_s") or 0) + (r.get("sys_s") or 0) for r in ok if r.get("wall_s") is not None]
            last = ok[-1] if ok else rs[-1]
            steps = "-" if last.get("steps_run") is None else f"{last['steps_run']}/{last.get('steps_cached', 0)}"
            dl.append([
                link, scenario, t,
                f"{statistics.median(walls):.2f}" if walls else "-",
                f"{min(walls):.2f}-{max(walls):.2f}" if len(walls) > 1 else "",
                f"{statistics.median(cpu):.2f}" if cpu else "-",
                f"{median(ok, 'max_rss_kb') / 1024:.0f}" if median(ok, "max_rss_kb") else "-",
                fmt_bytes(median(ok, "bytes_down")), fmt_bytes(median(ok, "bytes_up")),
                steps, f"{len(ok)}/{len(rs)}",
                "ok" if len(ok) == len(rs) else f"failed: {rs[-1].get('reason', '?') if not ok else [r for r in rs if r['status'] != 'ok'][-1].get('reason', '?')}"[:80],
            ])
    widths = [max(len(str(l[i])) for l in dl) for i in range(len(dhead))]
    detail = []
    for n, l in enumerate(dl):
        detail.append("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip())
        if n == 0:
            detail.append("  ".join("-" * w for w in widths))

    print(summary)
    print()
    print("\n".join(detail))
    json.dump({"meta": meta, "results": rows}, open(sys.argv[2], "w"), indent=2)
    if len(sys.argv) > 3:
        open(sys.argv[3], "w").write(summary + "\n\n```\n" + "\n".join(detail) + "\n```\n")
    print(f"\nJSON: {sys.argv[2]}")


if __name__ == "__main__":
    main()
