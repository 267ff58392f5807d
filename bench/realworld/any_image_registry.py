"""A registry that answers every repository and tag with one small multi-platform image
(config only, no layers, PATH as its only Env), so BuildKit's `outline` and `lint`
subrequests can resolve base images on a machine without Docker Hub.

Usage: python3 any_image_registry.py PORT   (serves plain HTTP on 127.0.0.1:PORT)
A reference pinned by digest (`image@sha256:...`) is not found: its bytes cannot be made up.
"""
import hashlib, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PLATFORMS = [("linux","amd64",None),("linux","arm64",None),("linux","arm","v7"),("linux","arm","v6"),
             ("linux","s390x",None),("linux","ppc64le",None),("linux","riscv64",None),("linux","386",None),
             ("windows","amd64",None)]
BLOBS, MANIFESTS = {}, {}
def put(store, obj):
    b = json.dumps(obj, separators=(",", ":")).encode()
    d = "sha256:" + hashlib.sha256(b).hexdigest()
    store[d] = b
    return d, len(b)
entries = []
for os_, arch, var in PLATFORMS:
    cfg = {"architecture": arch, "os": os_, "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
           "rootfs": {"type": "layers", "diff_ids": []}}
    if var: cfg["variant"] = var
    cd, cl = put(BLOBS, cfg)
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cl}, "layers": []}
    md, ml = put(MANIFESTS, m)
    p = {"os": os_, "architecture": arch}
    if var: p["variant"] = var
    entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ml, "platform": p})
INDEX = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}, separators=(",", ":")).encode()
INDEX_D = "sha256:" + hashlib.sha256(INDEX).hexdigest()

class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self, body, ctype, digest):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if self.command == "GET": self.wfile.write(body)
    def do_GET(self):
        p = self.path.split("?")[0]
        if p in ("/v2/", "/v2"):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
            if self.command == "GET": self.wfile.write(b"{}")
            return
        if "/manifests/" in p:
            ref = p.rsplit("/manifests/", 1)[1]
            if ref in MANIFESTS: return self.answer(MANIFESTS[ref], "application/vnd.oci.image.manifest.v1+json", ref)
            if ref.startswith("sha256:") and ref != INDEX_D:
                self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
            return self.answer(INDEX, "application/vnd.oci.image.index.v1+json", INDEX_D)
        if "/blobs/" in p:
            d = p.rsplit("/blobs/", 1)[1]
            if d in BLOBS: return self.answer(BLOBS[d], "application/octet-stream", d)
        self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
    do_HEAD = do_GET

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
