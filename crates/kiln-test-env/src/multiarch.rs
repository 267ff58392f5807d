//! Base images of two architectures made on this machine (there is no Docker Hub here), and
//! the QEMU emulation that runs the foreign one.
//!
//! - [`busybox_rootfs`]: a root filesystem of Debian's static busybox for an architecture:
//!   the host's own `/bin/busybox` for the native one, `apt-get download busybox-static:ARCH`
//!   unpacked for a foreign one (needs `dpkg --add-architecture ARCH` and `apt-get update`,
//!   which `.ci/install` does for arm64). Made once and cached under the target dir.
//! - [`push_busybox_index`]: an OCI layout holding an image index of the amd64 and arm64
//!   images (each config naming its `os`/`architecture`, each index entry its `platform`),
//!   pushed to a registry with `skopeo copy --all`.
//! - [`ensure_binfmt`]: binfmt_misc mounted and the platform's `qemu-*` handler registered
//!   with the `F` (fix-binary) flag, so RUN steps and `podman run --arch` of that platform
//!   work; it fails saying what to install when it cannot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::INSTALL_HINT;

/// Where the kernel mounts binfmt_misc.
const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// The architectures of the index [`push_busybox_index`] pushes, in its order.
pub const INDEX_ARCHES: &[&str] = &["amd64", "arm64"];

/// A fixed time for the layers' files and the configs, so the images are the same bytes on
/// every run.
const EPOCH: u64 = 1_700_000_000;

/// The tag [`push_busybox_index`] pushes.
pub const INDEX_TAG: &str = "latest";

/// Debian's name of an OCI architecture (`arm64` → `arm64`, `arm` → `armhf`).
fn dpkg_arch(arch: &str) -> Result<&'static str, String> {
    Ok(match arch {
        "amd64" => "amd64",
        "arm64" => "arm64",
        "arm" => "armhf",
        "386" => "i386",
        "ppc64le" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => {
            return Err(format!(
                "architecture `{other}`: no Debian architecture for it"
            ))
        }
    })
}

/// The `qemu-NAME` of an OCI architecture's emulator and binfmt_misc handler.
fn qemu_name(arch: &str) -> Result<&'static str, String> {
    Ok(match arch {
        "amd64" => "qemu-x86_64",
        "arm64" => "qemu-aarch64",
        "arm" => "qemu-arm",
        "386" => "qemu-i386",
        "ppc64le" => "qemu-ppc64le",
        "s390x" => "qemu-s390x",
        "riscv64" => "qemu-riscv64",
        other => {
            return Err(format!(
                "architecture `{other}`: no QEMU emulator known for it"
            ))
        }
    })
}

/// The OCI architectures this machine's kernel runs without emulation.
fn native_arches() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["amd64", "386"],
        "aarch64" => &["arm64"],
        "arm" => &["arm"],
        "powerpc64" => &["ppc64le"],
        "s390x" => &["s390x"],
        "riscv64" => &["riscv64"],
        _ => &[],
    }
}

/// Debian's architecture of this machine (`dpkg --print-architecture`).
fn host_dpkg_arch() -> String {
    let out = run(Command::new("dpkg").arg("--print-architecture"), "dpkg");
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// The directory test inputs made once are cached in: `$CARGO_TARGET_DIR`, else the target
/// dir the running test binary was built into (`target/debug/deps/NAME`), else the
/// workspace's `target/`; then `kiln-test-cache/`.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let deps = exe.ancestors().find(|a| a.ends_with("deps"))?;
            Some(deps.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("kiln-test-cache")
}

/// A fresh scratch directory of this process under `parent` (removed by the caller).
fn scratch(parent: &Path, what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = parent.join(format!(".{what}.{}.{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Runs `cmd`; its stdout, or a failure of the calling test naming `what` and its stderr.
#[track_caller]
fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}: {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A root filesystem of Debian's static busybox for the OCI architecture `arch` (`amd64`,
/// `arm64`): `bin/busybox` with a link per applet, `etc/passwd`, `etc/group`, `tmp/`. The
/// host's `/bin/busybox` when `arch` is the host's; else `busybox-static:ARCH` fetched with
/// `apt-get download` and unpacked. Made once per target dir (safe to call from tests
/// running side by side); fails the calling test, saying what to run, when it cannot.
#[track_caller]
pub fn busybox_rootfs(arch: &str) -> PathBuf {
    let deb_arch = dpkg_arch(arch).unwrap_or_else(|e| panic!("{e}"));
    let parent = cache_dir().join("multiarch");
    let rootfs = parent.join(format!("busybox-{arch}"));
    if rootfs.join("bin/busybox").exists() {
        return rootfs;
    }
    std::fs::create_dir_all(&parent)
        .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    let work = scratch(&parent, &format!("busybox-{arch}"));
    let tree = work.join("rootfs");
    let bin = tree.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    if deb_arch == host_dpkg_arch() {
        std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap_or_else(|e| {
            panic!("copying /bin/busybox: {e}: busybox-static is not installed: {INSTALL_HINT}")
        });
    } else {
        let pkg = format!("busybox-static:{deb_arch}");
        let out = Command::new("apt-get")
            .args(["download", "-qq", &pkg])
            .current_dir(&work)
            .output()
            .unwrap_or_else(|e| panic!("running apt-get: {e}"));
        assert!(
            out.status.success(),
            "apt-get download {pkg} failed: {}\nthe machine needs `dpkg --add-architecture {deb_arch} && apt-get update` ({INSTALL_HINT})",
            String::from_utf8_lossy(&out.stderr)
        );
        let deb = std::fs::read_dir(&work)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .unwrap_or_else(|| panic!("apt-get download {pkg} wrote no .deb"));
        let unpacked = work.join("deb");
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
            "dpkg-deb -x",
        );
        std::fs::rename(unpacked.join("bin/busybox"), bin.join("busybox"))
            .unwrap_or_else(|e| panic!("{pkg} has no bin/busybox: {e}"));
    }
    // The applets are the same in every architecture's build of one Debian version: the
    // host's busybox lists them (a foreign binary would need emulation to ask).
    let list = run(
        Command::new("/bin/busybox").arg("--list"),
        "/bin/busybox --list",
    );
    for applet in String::from_utf8_lossy(&list).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for dir in ["etc", "tmp", "root"] {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    // Another process may have finished first: then its tree stays and ours goes.
    let _ = std::fs::rename(&tree, &rootfs);
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        rootfs.join("bin/busybox").exists(),
        "{} was not made",
        rootfs.display()
    );
    rootfs
}

/// The hex SHA-256 of a file.
#[track_caller]
fn sha256_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), "sha256sum");
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Moves `file` into the layout's blobs as its digest; returns `(digest, size)`.
#[track_caller]
fn add_blob(layout: &Path, file: &Path) -> (String, u64) {
    let hex = sha256_file(file);
    let size = std::fs::metadata(file).unwrap().len();
    std::fs::rename(file, layout.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), size)
}

/// Writes `text` as a blob of the layout; returns `(digest, size)`.
#[track_caller]
fn add_json_blob(layout: &Path, text: &str) -> (String, u64) {
    let file = layout.join("blob.tmp");
    std::fs::write(&file, text).unwrap();
    add_blob(layout, &file)
}

/// Adds the image of [`busybox_rootfs`]`(rootfs_arch)` to the layout: one gzip layer, a
/// config naming `linux`/`arch`; returns the manifest's `(digest, size)`.
#[track_caller]
fn add_image(layout: &Path, arch: &str, rootfs_arch: &str) -> (String, u64) {
    let rootfs = busybox_rootfs(rootfs_arch);
    let tar = layout.join("layer.tar");
    run(
        Command::new("tar")
            .args([
                "--sort=name",
                &format!("--mtime=@{EPOCH}"),
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        "tar",
    );
    let diff_id = format!("sha256:{}", sha256_file(&tar));
    run(Command::new("gzip").args(["-n", "-9"]).arg(&tar), "gzip");
    let (layer, layer_size) = add_blob(layout, &layout.join("layer.tar.gz"));
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","created":"2023-11-14T22:13:20Z","config":{{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}},"history":[{{"created":"2023-11-14T22:13:20Z","created_by":"Debian busybox-static ({arch})"}}]}}"#
    );
    let (config, config_size) = add_json_blob(layout, &config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_size}}}]}}"#
    );
    add_json_blob(layout, &manifest)
}

/// Writes an OCI layout at `layout` whose `index.json` tags [`INDEX_TAG`] as an image index
/// of the busybox images of [`INDEX_ARCHES`] (each entry with its `platform`); returns the
/// index's digest.
#[track_caller]
pub fn write_busybox_index_layout(layout: &Path) -> String {
    let images: Vec<(&str, &str)> = INDEX_ARCHES.iter().map(|a| (*a, *a)).collect();
    write_busybox_index_layout_of(layout, &images)
}

/// [`write_busybox_index_layout`] of the images `(arch, rootfs_arch)`: each labelled
/// `linux`/`arch` and holding [`busybox_rootfs`]`(rootfs_arch)`, e.g. `("386", "amd64")`
/// for a linux/386 image the x86_64 kernel runs natively from the host's busybox.
#[track_caller]
pub fn write_busybox_index_layout_of(layout: &Path, images: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let entries: Vec<String> = images
        .iter()
        .map(|(arch, rootfs_arch)| {
            let (digest, size) = add_image(layout, arch, rootfs_arch);
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
            )
        })
        .collect();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        entries.join(",")
    );
    let (digest, size) = add_json_blob(layout, &index);
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"{INDEX_TAG}"}}}}]}}"#
        ),
    )
    .unwrap();
    digest
}

/// Pushes an image index of busybox for linux/amd64 and linux/arm64 to `registry`
/// (`host:port`, plain HTTP) as `repo:latest` with `skopeo copy --all` from an OCI layout
/// ([`write_busybox_index_layout`]); returns the reference `registry/repo:latest`. Fails
/// the calling test when skopeo or the push fails.
#[track_caller]
pub fn push_busybox_index(registry: &str, repo: &str) -> String {
    let images: Vec<(&str, &str)> = INDEX_ARCHES.iter().map(|a| (*a, *a)).collect();
    push_busybox_index_of(registry, repo, &images)
}

/// [`push_busybox_index`] of the images `(arch, rootfs_arch)`, as
/// [`write_busybox_index_layout_of`] makes them.
#[track_caller]
pub fn push_busybox_index_of(registry: &str, repo: &str, images: &[(&str, &str)]) -> String {
    crate::require_program("skopeo");
    let parent = cache_dir().join("multiarch");
    std::fs::create_dir_all(&parent).unwrap();
    let layout = scratch(&parent, "layout");
    write_busybox_index_layout_of(&layout, images);
    let reference = format!("{registry}/{repo}:{INDEX_TAG}");
    run(
        Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "-q",
            ])
            .arg(format!("oci:{}:{INDEX_TAG}", layout.display()))
            .arg(format!("docker://{reference}")),
        "skopeo copy --all",
    );
    let _ = std::fs::remove_dir_all(&layout);
    reference
}

/// Makes sure this machine runs binaries of the OCI architecture `arch` (`arm64`): nothing
/// to do when it is native; else binfmt_misc is mounted and enabled, and Debian's
/// `qemu-NAME` handler (of `qemu-user-static`) is registered, enabled, and has the `F`
/// flag (re-registered when it lacks it) — with `update-binfmts --enable` where
/// `binfmt-support` is installed, else by writing the line of
/// `/usr/lib/binfmt.d/qemu-NAME.conf` to binfmt_misc's `register`. Needs root. The error
/// says what is missing and what to install. What it registers stays registered.
pub fn ensure_binfmt(arch: &str) -> Result<(), String> {
    if native_arches().contains(&arch) {
        return Ok(());
    }
    let qemu = qemu_name(arch)?;
    // One test binary's tests register side by side: one at a time.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(BINFMT_DIR);
    if !dir.join("status").exists() {
        let out = Command::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR])
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mounting binfmt_misc at {BINFMT_DIR} failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    if status.trim() != "enabled" {
        std::fs::write(dir.join("status"), "1")
            .map_err(|e| format!("enabling binfmt_misc ({BINFMT_DIR}/status): {e}"))?;
    }
    let handler = dir.join(qemu);
    let conf = PathBuf::from(format!("/usr/lib/binfmt.d/{qemu}.conf"));
    if let Ok(text) = std::fs::read_to_string(&handler) {
        if !flags_of(&text).contains('F') {
            // Registered without F: the kernel would look the interpreter up inside each
            // container's root, where it is not. Remove it and register it again.
            std::fs::write(&handler, "-1")
                .map_err(|e| format!("unregistering {}: {e}", handler.display()))?;
        } else if text.lines().next() != Some("enabled") {
            std::fs::write(&handler, "1")
                .map_err(|e| format!("enabling {}: {e}", handler.display()))?;
        }
    }
    if !handler.exists() {
        if !conf.exists() {
            return Err(format!(
                "{} is missing: install Debian's qemu-user-static (`apt-get install qemu-user-static`; {INSTALL_HINT})",
                conf.display()
            ));
        }
        let binfmts = PathBuf::from(format!("/usr/share/binfmts/{qemu}"));
        let by_tool = crate::find_program("update-binfmts").is_some()
            && binfmts.exists()
            && Command::new("update-binfmts")
                .args(["--enable", qemu])
                .output()
                .is_ok_and(|o| o.status.success());
        if !by_tool || !handler.exists() {
            let line = std::fs::read_to_string(&conf)
                .map_err(|e| format!("reading {}: {e}", conf.display()))?;
            let line = line
                .lines()
                .find(|l| l.starts_with(':'))
                .ok_or_else(|| format!("{} has no registration line", conf.display()))?;
            if let Err(e) = std::fs::write(dir.join("register"), line) {
                // Another process may have registered it meanwhile.
                if !handler.exists() {
                    return Err(format!(
                        "registering {qemu} (writing {}'s line to {BINFMT_DIR}/register): {e}",
                        conf.display()
                    ));
                }
            }
        }
    }
    let text = std::fs::read_to_string(&handler)
        .map_err(|e| format!("{} is not registered: {e}", handler.display()))?;
    if text.lines().next() != Some("enabled") || !flags_of(&text).contains('F') {
        return Err(format!(
            "{} is registered but not enabled with the F flag:\n{text}",
            handler.display()
        ));
    }
    Ok(())
}

/// The `flags:` of a binfmt_misc handler file's text.
fn flags_of(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(str::trim)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_map_to_debian_and_qemu_names() {
        assert_eq!(dpkg_arch("arm64").unwrap(), "arm64");
        assert_eq!(dpkg_arch("arm").unwrap(), "armhf");
        assert_eq!(qemu_name("arm64").unwrap(), "qemu-aarch64");
        assert!(dpkg_arch("mips").unwrap_err().contains("`mips`"));
        assert!(qemu_name("mips").is_err());
    }

    #[test]
    fn flags_are_read_from_the_handler_text() {
        let text = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n";
        assert_eq!(flags_of(text), "POF");
        assert_eq!(flags_of("disabled\n"), "");
    }

    #[test]
    fn the_native_architecture_needs_no_handler() {
        for arch in native_arches() {
            assert_eq!(ensure_binfmt(arch), Ok(()));
        }
    }
}
