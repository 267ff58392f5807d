//! Base images made by real tools build, and their files come out right: umoci (its layers
//! start with a `.` root entry; `umoci insert` writes no parent entries, puts an opaque
//! marker before its dir, and ends its layers right after the last file's data, without
//! padding or end-of-archive blocks), skopeo re-encoding them with Docker v2 schema 2 media types and
//! zstd, and layers written by GNU tar and Python's tarfile (absolute names, duplicates, a
//! dir after its children, sparse files, long names) in plain, gzip and zstd blobs.
//!
//! Needs root (containers) and umoci, skopeo, tar, zstd and python3 (.ci/install).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? see .ci/install)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn umoci(args: &[&str]) -> String {
    run_ok(Command::new("umoci").args(args))
}

fn project(f: &Fixture, name: &str, dockerfile: &str) -> std::path::PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// Builds `dir` with extra flags and exports the result to a fresh local dir.
fn build_to_dir(f: &Fixture, dir: &Path, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let dest = f.path(out);
    let o = format!("type=local,dest={}", dest.display());
    let mut args = vec!["--output", &o];
    args.extend(extra);
    f.build_dir(dir, &args);
    dest
}

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// An OCI layout `layout:base` made with umoci only: a busybox rootfs repacked, a second
/// repack that deletes, changes and hardlinks, then `umoci insert` of a tree (no parent
/// entries), of a whiteout and of an opaque replacement, and an ENV and WORKDIR set by
/// `umoci config`.
fn umoci_image(work: &Path) -> std::path::PathBuf {
    let layout = work.join("layout");
    let l = layout.to_str().unwrap();
    let image = format!("{l}:base");
    let bundle = work.join("bundle");
    let b = bundle.to_str().unwrap();
    umoci(&["init", "--layout", l]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, b]);
    let rootfs = bundle.join("rootfs");
    busybox_rootfs(&rootfs);
    std::fs::create_dir_all(rootfs.join("srv")).unwrap();
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::write(rootfs.join("srv/app.txt"), "app\n").unwrap();
    std::fs::set_permissions(
        rootfs.join("srv/app.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(rootfs.join("srv/app.txt"), Some(33), Some(33)).unwrap();
    std::fs::write(rootfs.join("srv/old.txt"), "to be deleted\n").unwrap();
    std::fs::write(rootfs.join("data/lower"), "hidden by an opaque dir\n").unwrap();
    umoci(&["repack", "--image", &image, b]);
    // Second layer: umoci's own diff (a whiteout, a changed file, a hardlink, a symlink),
    // from a bundle of the image as it now is (a repack diffs against what was unpacked).
    let bundle = work.join("bundle2");
    let b = bundle.to_str().unwrap();
    umoci(&["unpack", "--image", &image, b]);
    let rootfs = bundle.join("rootfs");
    std::fs::remove_file(rootfs.join("srv/old.txt")).unwrap();
    std::fs::write(rootfs.join("srv/app.txt"), "app v2\n").unwrap();
    std::fs::hard_link(rootfs.join("srv/app.txt"), rootfs.join("srv/app-link")).unwrap();
    std::os::unix::fs::symlink("app.txt", rootfs.join("srv/sym")).unwrap();
    umoci(&["repack", "--image", &image, b]);
    let ins = work.join("ins");
    std::fs::create_dir_all(ins.join("sub")).unwrap();
    std::fs::write(ins.join("sub/f"), "inserted\n").unwrap();
    let i = ins.to_str().unwrap();
    umoci(&["insert", "--image", &image, i, "/opt/ins"]);
    umoci(&["insert", "--image", &image, "--whiteout", "/etc/group"]);
    umoci(&["insert", "--image", &image, "--opaque", i, "/data"]);
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.env",
        "GREETING=from-umoci",
        "--config.workingdir",
        "/srv",
    ]);
    layout
}

/// The checks a build from the umoci image must pass: its files from every layer (and what
/// the layers deleted) in the exported rootfs, and a RUN step that saw them.
fn assert_umoci_files(out: &Path) {
    assert_eq!(read(out, "srv/app.txt"), "app v2\n");
    let md = std::fs::metadata(out.join("srv/app.txt")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (33, 33));
    assert_eq!(
        std::fs::read_link(out.join("srv/sym")).unwrap(),
        Path::new("app.txt")
    );
    assert!(
        !out.join("srv/old.txt").exists(),
        "whiteout from umoci's diff"
    );
    assert!(!out.join("etc/group").exists(), "umoci insert --whiteout");
    assert!(out.join("etc/passwd").exists());
    assert_eq!(read(out, "opt/ins/sub/f"), "inserted\n");
    assert_eq!(read(out, "data/sub/f"), "inserted\n");
    assert!(!out.join("data/lower").exists(), "umoci insert --opaque");
    // What the RUN step saw inside the container.
    assert_eq!(read(out, "ran"), "from-umoci /srv\n");
    let inodes: Vec<String> = read(out, "inodes").lines().map(str::to_owned).collect();
    assert_eq!(inodes.len(), 2);
    assert_eq!(
        inodes[0], inodes[1],
        "srv/app-link is a hard link to app.txt"
    );
    assert_eq!(read(out, "link-content"), "app v2\n");
}

const RUN_CHECKS: &str = "RUN echo \"$GREETING $(pwd)\" > /ran && stat -c %i /srv/app.txt \
    /srv/app-link > /inodes && cat /srv/app-link > /link-content\n";

#[test]
fn a_umoci_made_base_image_builds_and_its_files_are_right() {
    assert!(
        is_root(),
        "needs root (containers, overlayfs); CI runs as root"
    );
    let f = Fixture::new();
    let layout = umoci_image(&f.path("umoci"));
    let dir = project(&f, "from-umoci", &format!("FROM base\n{RUN_CHECKS}"));
    let ctx = format!("base=oci-layout://{}:base", layout.display());
    let out = build_to_dir(&f, &dir, "out-umoci", &["--build-context", &ctx]);
    assert_umoci_files(&out);
    f.assert_store_clean("after the umoci build");
}

#[test]
fn umoci_layers_reencoded_by_skopeo_as_docker_v2s2_and_zstd_build_from_a_registry() {
    assert!(
        is_root(),
        "needs root (containers, overlayfs); CI runs as root"
    );
    let f = Fixture::new();
    let layout = umoci_image(&f.path("umoci"));
    let src = format!("oci:{}:base", layout.display());
    // skopeo keeps a compressed layer's bytes; to get zstd it must start from plain layers.
    let plain = format!("dir:{}", f.path("plain").display());
    run_ok(Command::new("skopeo").args(["copy", "--quiet", "--dest-decompress", &src, &plain]));
    // A registry per case: skopeo's blob cache would otherwise reuse the blobs the other case
    // pushed instead of encoding the layers as asked.
    let cases: [(&str, &str, &[&str], &str); 2] = [
        (
            "zstd",
            &plain,
            &["--format", "oci", "--dest-compress-format", "zstd"],
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "docker",
            &src,
            &["--format", "v2s2"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ];
    for (name, from, flags, layer_type) in cases {
        let reg = TestRegistry::kiln();
        let image = format!("{}/shapes/{name}:1", reg.addr);
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(flags)
            .arg(from)
            .arg(format!("docker://{image}"));
        run_ok(&mut cmd);
        let manifest = skopeo_inspect(&image, &["--raw"]);
        let types: Vec<&str> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap())
            .collect();
        assert!(
            types.len() == 5 && types.iter().all(|t| *t == layer_type),
            "{name}: skopeo pushed {types:?}"
        );
        let dir = project(
            &f,
            &format!("from-{name}"),
            &format!("FROM {image}\n{RUN_CHECKS}"),
        );
        let out = build_to_dir(&f, &dir, &format!("out-{name}"), &[]);
        assert_umoci_files(&out);
    }
}

/// Assembles an OCI layout from layer tars written by GNU tar and Python's tarfile, each
/// blob stored plain, gzip'd or zstd'd by the real tools. Arguments: the work dir.
const PY_LAYOUT: &str = r##"
import gzip, hashlib, io, json, os, subprocess, sys, tarfile
work = sys.argv[1]
lay = os.path.join(work, "layout")
os.makedirs(os.path.join(lay, "blobs", "sha256"), exist_ok=True)

def blob(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(lay, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d

def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link=""):
    i = tarfile.TarInfo(name)
    i.type, i.mode, i.mtime, i.linkname = kind, mode, 1700000000, link
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

# Layer 1: the busybox rootfs by GNU tar with absolute member names (-P), zstd.
l1 = subprocess.run(["tar", "-P", "--transform", "s|^" + work + "/rootfs|/|", "-cf", "-",
                     work + "/rootfs"], check=True, capture_output=True).stdout
# Layer 2: Python's tarfile, the shapes umoci and others write, uncompressed.
b = io.BytesIO()
with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
    add(t, "/", tarfile.DIRTYPE, mode=0o755)
    add(t, "/srv/late/file", data=b"dir entry comes after me\n")
    add(t, "/srv/late", tarfile.DIRTYPE, mode=0o750)
    add(t, "srv/dup", data=b"first\n")
    add(t, "srv/dup", data=b"second\n")
    add(t, "./srv/" + "n" * 150, data=b"long name\n")
    add(t, "srv/hard", tarfile.LNKTYPE, link="/srv/dup")
l2 = b.getvalue()
# Layer 3: GNU tar, sparse and ./-prefixed, gzip.
l3 = subprocess.run(["tar", "-C", work + "/sparse", "--sparse", "-cf", "-", "."],
                    check=True, capture_output=True).stdout

layers, diff_ids = [], []
for data, how in [(l1, "zstd"), (l2, "plain"), (l3, "gzip")]:
    diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
    if how == "zstd":
        packed = subprocess.run(["zstd", "-qc"], input=data, check=True,
                                capture_output=True).stdout
        mt = "application/vnd.oci.image.layer.v1.tar+zstd"
    elif how == "gzip":
        packed = gzip.compress(data, mtime=0)
        mt = "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        packed, mt = data, "application/vnd.oci.image.layer.v1.tar"
    layers.append({"mediaType": mt, "digest": blob(packed), "size": len(packed)})
config = json.dumps({"architecture": sys.argv[2], "os": "linux",
                     "config": {"Env": ["PATH=/bin"]},
                     "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
manifest = json.dumps({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": blob(config), "size": len(config)},
                       "layers": layers}).encode()
index = {"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
    "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
with open(os.path.join(lay, "index.json"), "w") as f:
    json.dump(index, f)
with open(os.path.join(lay, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
"##;

#[test]
fn a_base_image_of_tar_and_python_layers_builds_and_its_files_are_right() {
    assert!(
        is_root(),
        "needs root (containers, overlayfs); CI runs as root"
    );
    let f = Fixture::new();
    let work = f.path("tools");
    busybox_rootfs(&work.join("rootfs"));
    std::fs::create_dir_all(work.join("sparse")).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut s = std::fs::File::create(work.join("sparse/holes")).unwrap();
        s.seek(SeekFrom::Start(2 << 20)).unwrap();
        s.write_all(b"after a hole\n").unwrap();
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    run_ok(
        Command::new("python3")
            .args(["-c", PY_LAYOUT])
            .arg(&work)
            .arg(arch),
    );
    let dir = project(
        &f,
        "from-tools",
        "FROM base\nRUN cat /srv/late/file /srv/dup /srv/hard > /ran && \
         stat -c %i /srv/dup /srv/hard > /inodes && tail -c 13 /holes > /tail && \
         stat -c %s /holes > /size\n",
    );
    let ctx = format!("base=oci-layout://{}:v1", work.join("layout").display());
    let out = build_to_dir(&f, &dir, "out-tools", &["--build-context", &ctx]);
    assert_eq!(
        read(&out, "ran"),
        "dir entry comes after me\nsecond\nsecond\n"
    );
    let inodes: Vec<String> = read(&out, "inodes").lines().map(str::to_owned).collect();
    assert_eq!(inodes.len(), 2);
    assert_eq!(inodes[0], inodes[1], "srv/hard links to the later srv/dup");
    assert_eq!(read(&out, "tail"), "after a hole\n");
    assert_eq!(read(&out, "size").trim(), ((2 << 20) + 13).to_string());
    assert_eq!(
        std::fs::metadata(out.join("srv/late"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    assert_eq!(
        read(&out, &format!("srv/{}", "n".repeat(150))),
        "long name\n"
    );
    assert!(
        out.join("bin/busybox").is_file(),
        "absolute names re-rooted"
    );
    f.assert_store_clean("after the tools build");
}

/// `buildah` with storage of its own under `work`, with podman's machine config.
fn buildah(work: &Path, args: &[&str]) -> String {
    require_program("buildah");
    let mut cmd = Command::new("buildah");
    cmd.arg("--root")
        .arg(work.join("storage"))
        .arg("--runroot")
        .arg(work.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args);
    cmd.env("CONTAINERS_CONF", podman_conf());
    run_ok(&mut cmd).trim().to_owned()
}

#[test]
fn a_buildah_commit_builds_as_an_uncompressed_oci_layout_and_as_docker_v2s2() {
    assert!(
        is_root(),
        "needs root (containers, overlayfs); CI runs as root"
    );
    let f = Fixture::new();
    let work = f.path("buildah");
    let ctr = buildah(&work, &["from", "scratch"]);
    let mnt = std::path::PathBuf::from(buildah(&work, &["mount", &ctr]));
    busybox_rootfs(&mnt);
    std::fs::write(mnt.join("etc/hello"), "hello from buildah\n").unwrap();
    std::fs::hard_link(mnt.join("etc/hello"), mnt.join("etc/hello-link")).unwrap();
    let fifo = std::ffi::CString::new(mnt.join("etc/fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    buildah(
        &work,
        &[
            "config",
            "--env",
            "GREETING=buildah",
            "--workingdir",
            "/etc",
            &ctr,
        ],
    );
    let layout = work.join("layout");
    buildah(
        &work,
        &[
            "commit",
            "-q",
            &ctr,
            &format!("oci:{}:v1", layout.display()),
        ],
    );
    let reg = TestRegistry::kiln();
    let pushed = format!("{}/shapes/buildah:1", reg.addr);
    buildah(
        &work,
        &[
            "commit",
            "-q",
            "--format",
            "docker",
            "--tls-verify=false",
            &ctr,
            &format!("docker://{pushed}"),
        ],
    );
    let manifest = skopeo_inspect(&pushed, &["--raw"]);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let oci: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    assert_eq!(
        oci["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar",
        "buildah writes uncompressed layers to an OCI layout"
    );
    let checks = "RUN echo \"$GREETING $(pwd)\" > /ran && stat -c %i /etc/hello \
                  /etc/hello-link > /inodes && test -p /etc/fifo && touch /fifo-ok\n";
    let ctx = format!("base=oci-layout://{}:v1", layout.display());
    for (name, from, extra) in [
        (
            "layout",
            "base".to_owned(),
            vec!["--build-context", ctx.as_str()],
        ),
        ("registry", pushed.clone(), vec![]),
    ] {
        let dir = project(
            &f,
            &format!("from-buildah-{name}"),
            &format!("FROM {from}\n{checks}"),
        );
        let out = build_to_dir(&f, &dir, &format!("out-buildah-{name}"), &extra);
        assert_eq!(read(&out, "etc/hello"), "hello from buildah\n", "{name}");
        assert_eq!(read(&out, "ran"), "buildah /etc\n", "{name}");
        let inodes: Vec<String> = read(&out, "inodes").lines().map(str::to_owned).collect();
        assert!(
            inodes.len() == 2 && inodes[0] == inodes[1],
            "{name}: {inodes:?}"
        );
        assert!(out.join("fifo-ok").exists(), "{name}: /etc/fifo is a FIFO");
    }
    buildah(&work, &["rm", &ctr]);
}
