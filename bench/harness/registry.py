#!/usr/bin/env python3
"""What bench/run asks the bench registry (plain HTTP, no auth), with the standard library only.

    registry.py bytes REG REPO...               bytes each repository holds (every tag, each
                                                blob once) and all of them together, as JSON
    registry.py manifest REG REPO TAG           the image manifest of TAG (an index resolved to
                                                its first runnable platform), as JSON
    registry.py floor-image REG REPO TAG BEFORE NEWTAG
                                                pushes NEWTAG: an image of the layers TAG shares
                                                (as a prefix) with the manifest in file BEFORE,
                                                that is the layers the rerun steps sat on; prints
                                                {"layers", "bytes", "total_layers"} as JSON
"""
import hashlib
import json
import sys
import urllib.error
import urllib.request

MANIFEST_TYPES = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
]
INDEX_TYPES = MANIFEST_TYPES[:2]


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, resp.headers, resp.read()


def get_manifest(reg, repo, ref):
    _, headers, body = request("GET", f"http://{reg}/v2/{repo}/manifests/{ref}",
                               headers={"Accept": ", ".join(MANIFEST_TYPES)})
    doc = json.loads(body)
    media = doc.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
    return media, doc, body


def tags(reg, repo):
    try:
        _, _, body = request("GET", f"http://{reg}/v2/{repo}/tags/list")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise
    return json.loads(body).get("tags") or []


def walk(reg, repo, ref, seen):
    """Adds every blob (config, layers) and manifest under ref to seen: digest → size."""
    media, doc, body = get_manifest(reg, repo, ref)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest in seen:
        return
    seen[digest] = len(body)
    if media in INDEX_TYPES or "manifests" in doc:
        for m in doc.get("manifests", []):
            if m.get("mediaType") in MANIFEST_TYPES:
                walk(reg, repo, m["digest"], seen)
            else:  # BuildKit's cache index lists its layer blobs here
                seen[m["digest"]] = m.get("size", 0)
        return
    for d in [doc.get("config")] + doc.get("layers", []):
        if d:
            seen[d["digest"]] = d.get("size", 0)


def cmd_bytes(reg, repos):
    out, everything = {}, {}
    for repo in repos:
        seen = {}
        for t in tags(reg, repo):
            walk(reg, repo, t, seen)
        out[repo] = sum(seen.values())
        everything.update(seen)
    print(json.dumps({"repos": out, "total": sum(everything.values())}))


def image_manifest(reg, repo, ref):
    media, doc, _ = get_manifest(reg, repo, ref)
    if media in INDEX_TYPES or "manifests" in doc:
        for m in doc["manifests"]:
            p = m.get("platform") or {}
            if p.get("os", "linux") != "unknown" and m.get("mediaType") in MANIFEST_TYPES[2:]:
                return image_manifest(reg, repo, m["digest"])
        sys.exit(f"registry.py: {repo}:{ref} is an index without an image manifest")
    return doc


def put_blob(reg, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, headers, _ = request("POST", f"http://{reg}/v2/{repo}/blobs/uploads/")
    loc = headers.get("Location")
    if loc.startswith("/"):
        loc = f"http://{reg}{loc}"
    sep = "&" if "?" in loc else "?"
    request("PUT", f"{loc}{sep}digest={digest}", data=data,
            headers={"Content-Type": "application/octet-stream"})
    return digest


def cmd_floor_image(reg, repo, tag, before_file, newtag):
    before = json.load(open(before_file))
    after = image_manifest(reg, repo, tag)
    k = 0
    for a, b in zip(before["layers"], after["layers"]):
        if a["digest"] != b["digest"]:
            break
        k += 1
    layers = after["layers"][:k]
    _, _, cfg_body = request("GET", f"http://{reg}/v2/{repo}/blobs/{after['config']['digest']}")
    cfg = json.loads(cfg_body)
    floor_cfg = {"architecture": cfg.get("architecture", "amd64"), "os": cfg.get("os", "linux"),
                 "config": {}, "rootfs": {"type": "layers", "diff_ids": cfg["rootfs"]["diff_ids"][:k]}}
    data = json.dumps(floor_cfg, sort_keys=True).encode()
    cfg_digest = put_blob(reg, repo, data)
    manifest = {"schemaVersion": 2, "mediaType": after.get("mediaType", MANIFEST_TYPES[2]),
                "config": {"mediaType": after["config"]["mediaType"], "digest": cfg_digest, "size": len(data)},
                "layers": layers}
    request("PUT", f"http://{reg}/v2/{repo}/manifests/{newtag}", data=json.dumps(manifest).encode(),
            headers={"Content-Type": manifest["mediaType"]})
    print(json.dumps({"layers": k, "total_layers": len(after["layers"]),
                      "bytes": sum(l["size"] for l in layers)}))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, reg, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if cmd == "bytes":
        cmd_bytes(reg, args)
    elif cmd == "manifest":
        print(json.dumps(image_manifest(reg, args[0], args[1])))
    elif cmd == "floor-image":
        cmd_floor_image(reg, *args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
