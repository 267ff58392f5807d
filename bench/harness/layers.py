#!/usr/bin/env python3
"""Every blob one cold build left in the bench registry, one row each: where it is (the cache,
the image or both), its media type, its size, and what is inside a layer — the uncompressed
tar's size, its entry count, its first paths — and the size one zlib level-6 gzip stream of
the same tar takes (what BuildKit's default gzip writes), so a row shows whether a layer is
bigger for its compression or for its contents.

    layers.py REG CACHE_REPO[:TAG] IMAGE_REPO[:TAG] [--markdown]

Standard library only (zstd layers are listed without their contents unless `zstd` is on
PATH). Used to compare kiln's and BuildKit's registry bytes (docs/compression.md).
"""
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zlib

sys.path.insert(0, __import__("os").path.dirname(__file__))
from registry import INDEX_TYPES, get_manifest, request  # noqa: E402


def blob(reg, repo, digest):
    _, _, body = request("GET", f"http://{reg}/v2/{repo}/blobs/{digest}")
    return body


def listing(reg, repo, tag):
    """(kind, descriptor) of every blob under repo:tag, manifests included."""
    media, doc, body = get_manifest(reg, repo, tag)
    out = [("manifest", {"digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                          "size": len(body), "mediaType": media})]
    if media in INDEX_TYPES or "manifests" in doc:
        for m in doc.get("manifests", []):
            if m.get("mediaType", "").endswith("manifest.v1+json") or \
                    m.get("mediaType", "").endswith("manifest.v2+json"):
                out += [(k, d) for k, d in listing(reg, repo, m["digest"])]
            elif "cacheconfig" in m.get("mediaType", ""):
                out.append(("config", m))
            else:  # BuildKit's cache index lists its layers here
                out.append(("layer", m))
        return out
    if doc.get("config"):
        out.append(("config", doc["config"]))
    out += [("layer", l) for l in doc.get("layers", [])]
    return out


def inspect(data, media):
    if media.endswith("zstd") or data[:4] == b"\x28\xb5\x2f\xfd":
        if not shutil.which("zstd"):
            return None
        raw = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    elif data[:2] == b"\x1f\x8b":
        raw = gzip.decompress(data)
    else:
        raw = data
    names, members = [], 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as t:
        for m in t:
            members += 1
            if len(names) < 3:
                names.append(m.name)
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    gz6 = len(c.compress(raw)) + len(c.flush())
    return {"tar": len(raw), "entries": members, "first": names, "gzip6": gz6}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        sys.exit(__doc__)
    reg, cache, image = args
    where = {}
    for label, ref in (("cache", cache), ("image", image)):
        repo, _, tag = ref.partition(":")
        for kind, d in listing(reg, repo, tag or "latest"):
            e = where.setdefault(d["digest"], {"kind": kind, "size": d["size"],
                                               "media": d.get("mediaType", ""), "in": [],
                                               "repo": repo})
            if label not in e["in"]:
                e["in"].append(label)
    rows = []
    for digest, e in where.items():
        info = None
        if e["kind"] == "layer":
            info = inspect(blob(reg, e["repo"], digest), e["media"])
        rows.append((digest, e, info))
    totals = {"cache": 0, "image": 0}
    for _, e, _ in rows:
        for label in e["in"]:
            totals[label] += e["size"]
    if "--markdown" in sys.argv:
        print("| blob | in | kind | media | bytes | tar bytes | entries | gzip-6 of the tar | bytes / gzip-6 | first paths |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for digest, e, i in rows:
            media = e["media"].rsplit(".", 1)[-1] if e["media"] else ""
            if i:
                extra = f"{i['tar']} | {i['entries']} | {i['gzip6']} | {e['size'] / i['gzip6']:.3f} | {', '.join(i['first'])}"
            else:
                extra = " | | | | "
            print(f"| {digest[7:19]} | {'+'.join(e['in'])} | {e['kind']} | {media} | {e['size']} | {extra} |")
        print(f"\ncache {totals['cache']} bytes, image {totals['image']} bytes")
    else:
        print(json.dumps({"blobs": [dict(digest=d, **e, contents=i) for d, e, i in rows],
                          "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
