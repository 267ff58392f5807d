//! Test fixtures: a busybox-static rootfs and an overlay mounted on it, as kiln-store prepares.
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_exec::{CancelToken, CollectedOutput, ExecSpec, Executor, ExitStatus};

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
pub const GROUP: &str =
    "root:x:0:\nalice:x:1000:\nwheel:x:10:alice\nstaff:x:50:bob,alice\nnogroup:x:65534:\n";

pub use kiln_test_env::{require_program, require_root};

/// Writes a busybox-static rootfs into `dir`: /bin/busybox plus applet symlinks, /etc/passwd
/// and /etc/group, /tmp, /root. No /proc, /dev, /sys, /run, /etc/hosts or /etc/resolv.conf:
/// the executor must create those mount points and take them away again.
pub fn busybox_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static must be installed");
    fs::set_permissions(dir.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
    fs::write(dir.join("etc/group"), GROUP).unwrap();
    fs::write(dir.join("etc/motd"), "hello\n").unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir_all(dir.join("root")).unwrap();
    fs::create_dir_all(dir.join("data")).unwrap();
    fs::write(dir.join("data/keep.txt"), "keep\n").unwrap();
    fs::write(dir.join("data/remove.txt"), "remove\n").unwrap();
    fs::write(dir.join("data/mode.txt"), "mode\n").unwrap();
    fs::set_permissions(dir.join("data/mode.txt"), fs::Permissions::from_mode(0o644)).unwrap();
}

fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// An overlay rootfs: lower = a fresh busybox tree, a fresh upper and work dir; unmounted on drop.
pub struct OverlayRootfs {
    pub dir: tempfile::TempDir,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub merged: PathBuf,
}

impl OverlayRootfs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        busybox_rootfs(&lower);
        Self::with_lower(dir, lower)
    }

    pub fn with_lower(dir: tempfile::TempDir, lower: PathBuf) -> Self {
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        let merged = dir.path().join("merged");
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let data = CString::new(data).unwrap();
        // SAFETY: valid C strings.
        let r = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                cs(&merged).as_ptr(),
                c"overlay".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount overlay: {}", std::io::Error::last_os_error());
        OverlayRootfs {
            dir,
            lower,
            upper,
            merged,
        }
    }

    /// Every entry of the upper dir: relative path → description (type, mode, size, target).
    pub fn upper_tree(&self) -> BTreeMap<String, String> {
        tree(&self.upper)
    }
}

impl Drop for OverlayRootfs {
    fn drop(&mut self) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(cs(&self.merged).as_ptr(), libc::MNT_DETACH) };
    }
}

/// An overlay rootfs whose `/bin/busybox` is Debian's i386 `busybox-static` (ELF32, 80386).
#[cfg(target_arch = "x86_64")]
pub fn i386_busybox_overlay() -> OverlayRootfs {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    busybox_rootfs(&lower);
    let i386 = kiln_test_env::multiarch::busybox_rootfs("386").join("bin/busybox");
    let elf = fs::read(&i386).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x01", "{} is not ELF32", i386.display());
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 3, "not EM_386");
    fs::copy(&i386, lower.join("bin/busybox")).unwrap();
    OverlayRootfs::with_lower(dir, lower)
}

/// A deterministic description of a tree: path → "type mode uid:gid size/target/xattr".
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let desc = if ft.is_symlink() {
            format!(
                "link -> {}",
                fs::read_link(&p).unwrap_or_default().display()
            )
        } else if ft.is_dir() {
            format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
        } else if ft.is_file() {
            let content = fs::read(&p).unwrap_or_default();
            format!(
                "file {:o} {}:{} {}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                String::from_utf8_lossy(&content).trim_end()
            )
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() && m.rdev() == 0 {
                "whiteout".to_string()
            } else {
                format!("special {:o}", m.mode())
            }
        };
        out.insert(rel, desc);
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// `sh -c script` as a spec on `rootfs`.
pub fn sh(rootfs: &Path, script: &str) -> ExecSpec {
    ExecSpec::new(rootfs, vec!["/bin/sh".into(), "-c".into(), script.into()])
}

/// Runs a spec, collecting output.
pub fn run(exec: &dyn Executor, spec: &ExecSpec) -> (ExitStatus, CollectedOutput) {
    let mut out = CollectedOutput::default();
    let status = exec
        .run(spec, &mut out, &CancelToken::new())
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    (status, out)
}

/// What `uname -m` prints on this machine under `PER_LINUX32` (`None` where kiln has no
/// 32-bit personality to give).
pub fn linux32_machine() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("i686"),
        "aarch64" => Some("armv8l"),
        _ => None,
    }
}
