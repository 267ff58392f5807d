//! Helpers shared by the store's integration tests: a busybox rootfs, a tree comparison,
//! and a raw tar header builder for crafted archives.
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

pub use kiln_test_env::{is_root, require_root};

/// Writes a busybox-static rootfs into `dir`: /bin/busybox plus one symlink per applet.
pub fn write_busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "tmp", "root", "dev", "proc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: buffer and length match.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    let mut out = Vec::new();
    for name in buf.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: buffer and length match.
        let k = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if k >= 0 {
            v.truncate(k as usize);
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    out
}

/// One line per entry describing everything a layer must preserve: type, mode, owner,
/// mtime (seconds, as tar keeps them), size, content hash, link target, xattrs, and which
/// earlier path it is hardlinked to.
pub fn describe_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>, inodes: &mut HashMap<(u64, u64), String>) {
    let mut ents: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir".to_owned()
        } else if ft.is_symlink() {
            format!("symlink->{}", fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap();
            format!(
                "file size={} sha={}",
                data.len(),
                kiln_oci::Digest::sha256_of(&data)
                    .hex()
                    .get(..16)
                    .unwrap_or("")
            )
        } else if ft.is_char_device() {
            format!("char {}", md.rdev())
        } else if ft.is_block_device() {
            format!("block {}", md.rdev())
        } else if ft.is_fifo() {
            "fifo".to_owned()
        } else {
            "other".to_owned()
        };
        let mut link = String::new();
        if !ft.is_dir() && md.nlink() > 1 {
            match inodes.get(&(md.dev(), md.ino())) {
                Some(first) => link = format!(" hardlink={first}"),
                None => {
                    inodes.insert((md.dev(), md.ino()), rel.clone());
                }
            }
        }
        let mode = if ft.is_symlink() {
            0
        } else {
            md.mode() & 0o7777
        };
        let mtime = if ft.is_symlink() { 0 } else { md.mtime() };
        out.push(format!(
            "{rel}: {kind} mode={mode:o} uid={} gid={} mtime={mtime} xattrs={:?}{link}",
            md.uid(),
            md.gid(),
            xattrs(&p)
        ));
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// Asserts two trees are the same entry for entry (see [`describe_tree`]).
pub fn assert_same_tree(a: &Path, b: &Path) {
    let da = describe_tree(a);
    let db = describe_tree(b);
    let only_a: Vec<_> = da.iter().filter(|l| !db.contains(l)).collect();
    let only_b: Vec<_> = db.iter().filter(|l| !da.contains(l)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "trees differ\nonly in {}:\n{:#?}\nonly in {}:\n{:#?}",
        a.display(),
        only_a,
        b.display(),
        only_b
    );
}

/// A raw 512-byte ustar header with any name (no validation), plus data and padding.
pub fn raw_entry(name: &[u8], flag: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    raw_entry_sized(name, flag, link, data.len() as u64, data)
}

/// Like [`raw_entry`] but the size field may lie about the data that follows.
pub fn raw_entry_sized(name: &[u8], flag: u8, link: &[u8], size: u64, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    b[100..107].copy_from_slice(format!("{:07o}", 0o644).as_bytes());
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(format!("{:011o}", 1_700_000_000u64).as_bytes());
    b[156] = flag;
    b[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    if flag == b'3' {
        b[329..336].copy_from_slice(b"0000001");
        b[337..344].copy_from_slice(b"0000003");
    }
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    b.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    b.extend(std::iter::repeat_n(0u8, pad));
    b
}

/// Ends an archive.
pub fn tar_end(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let opts = kiln_oci::compression::CompressOptions {
        threads: 1,
        ..Default::default()
    };
    let mut w = kiln_oci::compression::Compressor::new(
        Vec::new(),
        kiln_oci::compression::Compression::Gzip,
        &opts,
    )
    .unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// A temp dir that, when dropped (also when a test panics), first unmounts every mount
/// left under it, so a failing test never leaves overlay mounts behind.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn new() -> Self {
        TestDir(tempfile::tempdir().unwrap())
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let base = self.0.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|p| p.starts_with(&base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let c = std::ffi::CString::new(p).unwrap();
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A store at `dir` with the snapshotter `kind`.
pub fn store_at(dir: &Path, kind: kiln_store::SnapshotterKind) -> kiln_store::Store {
    kiln_store::Store::open_with(
        dir,
        kiln_store::StoreOptions {
            snapshotter: Some(kind),
            ..Default::default()
        },
    )
    .unwrap()
}
