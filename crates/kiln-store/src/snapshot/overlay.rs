//! The overlayfs snapshotter.
//!
//! A mount's options must fit in one page (the kernel copies `data` with a PAGE_SIZE limit),
//! so a long chain of `lowerdir=` paths fails with mount(2). kiln then uses the new mount API
//! (fsopen/fsconfig/fsmount, kernel 6.8+), passing each layer as its own `lowerdir+` parameter,
//! which has no total-length limit. overlayfs itself stacks at most 500 lower layers
//! (OVL_MAX_STACK); deeper chains are refused with a clear error (the store flattens them
//! before that: see `Store::prepare`).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ApplyLayout, DiffSource, Mount, Snapshotter, SnapshotterKind};
use crate::error::{Result, StoreError};
use crate::sys;

/// overlayfs's limit on lower layers (fs/overlayfs/params.h, OVL_MAX_STACK).
pub const MAX_LOWER_LAYERS: usize = 500;

// redirect_dir and metacopy must stay off: with them a renamed dir or a chmod leaves only a
// pointer in the upper dir, and the upper dir would no longer be a complete layer diff.
const EXTRA: &[(&str, &str)] = &[
    ("redirect_dir", "off"),
    ("metacopy", "off"),
    ("index", "off"),
];

/// overlayfs snapshots under `<root>/snapshots`.
#[derive(Debug)]
pub struct OverlaySnapshotter {
    snapshots: PathBuf,
}

impl OverlaySnapshotter {
    /// A snapshotter for the snapshot dirs under `snapshots`.
    pub fn new(snapshots: PathBuf) -> Self {
        OverlaySnapshotter { snapshots }
    }

    fn empty_lower(&self) -> Result<PathBuf> {
        let p = self.snapshots.join("empty");
        fs::create_dir_all(&p).map_err(|e| StoreError::io("creating", &p, e))?;
        Ok(p)
    }

    fn mount(
        &self,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()> {
        fs::create_dir_all(target)
            .map_err(|e| StoreError::io("creating mount point", target, e))?;
        mount_overlay(lowers, upper, target)
    }
}

/// Whether writable mounts may use overlayfs's `volatile` option (Linux 5.10+): cleared the
/// first time a mount with it fails and the same mount without it succeeds.
static VOLATILE_OK: AtomicBool = AtomicBool::new(true);

fn data_string(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, volatile: bool) -> Vec<u8> {
    let mut d = b"lowerdir=".to_vec();
    for (i, l) in lowers.iter().enumerate() {
        if i > 0 {
            d.push(b':');
        }
        d.extend_from_slice(l.as_os_str().as_bytes());
    }
    if let Some((u, w)) = upper {
        d.extend_from_slice(b",upperdir=");
        d.extend_from_slice(u.as_os_str().as_bytes());
        d.extend_from_slice(b",workdir=");
        d.extend_from_slice(w.as_os_str().as_bytes());
        if volatile {
            d.extend_from_slice(b",volatile");
        }
    }
    for (k, v) in extra_options() {
        if v.is_empty() {
            d.extend_from_slice(format!(",{k}").as_bytes());
        } else {
            d.extend_from_slice(format!(",{k}={v}").as_bytes());
        }
    }
    d
}

/// [`EXTRA`], adjusted in a user namespace: there overlayfs needs `userxattr`, which refuses
/// to follow redirects (`redirect_dir=off` would still follow them): `nofollow` instead.
/// A flag option has an empty value.
fn extra_options() -> Vec<(&'static str, &'static str)> {
    if !sys::overlay_userxattr() {
        return EXTRA.to_vec();
    }
    let mut v: Vec<_> = EXTRA
        .iter()
        .map(|&(k, v)| {
            if k == "redirect_dir" {
                (k, "nofollow")
            } else {
                (k, v)
            }
        })
        .collect();
    v.push(("userxattr", ""));
    v
}

/// Mounts an overlay at `target`. A writable one is `volatile` where the kernel has it:
/// unmounting it then does not sync the whole upper filesystem (with other processes' dirty
/// data, a quarter to a third of a second per step on a busy disk); `Store::commit` makes
/// the snapshot durable itself before its record says committed.
fn mount_overlay(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, target: &Path) -> Result<()> {
    if upper.is_some() && VOLATILE_OK.load(Ordering::Relaxed) {
        match mount_overlay_with(lowers, upper, target, true) {
            Ok(()) => return Ok(()),
            Err(e) => {
                mount_overlay_with(lowers, upper, target, false).map_err(|_| e)?;
                VOLATILE_OK.store(false, Ordering::Relaxed);
                return Ok(());
            }
        }
    }
    mount_overlay_with(lowers, upper, target, false)
}

fn mount_overlay_with(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    volatile: bool,
) -> Result<()> {
    if lowers.len() > MAX_LOWER_LAYERS {
        return Err(StoreError::Mount {
            target: target.to_owned(),
            message: format!(
                "{} lower layers exceed overlayfs's limit of {MAX_LOWER_LAYERS}",
                lowers.len()
            ),
        });
    }
    let data = data_string(lowers, upper, volatile);
    // Paths containing ':' or ',' cannot be written in the legacy option string.
    let plain = lowers.iter().all(|l| {
        !l.as_os_str()
            .as_bytes()
            .iter()
            .any(|&b| b == b':' || b == b',')
    });
    let page = 4096usize;
    let mut first_err = None;
    if plain && data.len() < page {
        match sys::mount("overlay".as_ref(), target, "overlay", 0, Some(&data)) {
            Ok(()) => return Ok(()),
            Err(e) => first_err = Some(format!("mount(2): {e}")),
        }
    }
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let mut extra = extra_options();
    if volatile {
        extra.push(("volatile", ""));
    }
    match sys::mount_overlay_fsconfig(
        &refs,
        upper.map(|u| u.0),
        upper.map(|u| u.1),
        &extra,
        target,
    ) {
        Ok(()) => Ok(()),
        Err(e) => Err(StoreError::Mount {
            target: target.to_owned(),
            message: format!(
                "overlay with {} lower layers failed ({}new mount API: {e})",
                lowers.len(),
                first_err.map(|f| format!("{f}; ")).unwrap_or_default()
            ),
        }),
    }
}

/// Tries an overlay mount in a scratch dir under `snapshots`.
pub(crate) fn probe(snapshots: &Path) -> std::result::Result<(), String> {
    let dir = snapshots.join(format!("probe-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let run = || -> std::result::Result<(), String> {
        for d in ["lower", "upper", "work", "merged"] {
            fs::create_dir_all(dir.join(d)).map_err(|e| format!("creating probe dirs: {e}"))?;
        }
        fs::write(dir.join("lower/f"), b"x").map_err(|e| format!("writing probe file: {e}"))?;
        mount_overlay(
            &[dir.join("lower")],
            Some((&dir.join("upper"), &dir.join("work"))),
            &dir.join("merged"),
        )
        .map_err(|e| e.to_string())?;
        let seen =
            fs::read(dir.join("merged/f")).map_err(|e| format!("reading through overlay: {e}"));
        let _ = sys::unmount(&dir.join("merged"));
        match seen {
            Ok(b) if b == b"x" => Ok(()),
            Ok(_) => Err("overlay showed wrong content".into()),
            Err(e) => Err(e),
        }
    };
    let r = run();
    let _ = fs::remove_dir_all(&dir);
    r
}

impl Snapshotter for OverlaySnapshotter {
    fn kind(&self) -> SnapshotterKind {
        SnapshotterKind::Overlay
    }

    fn prepare(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf> {
        let (fsd, work, rootfs) = (dir.join("fs"), dir.join("work"), dir.join("rootfs"));
        for d in [&fsd, &work] {
            fs::create_dir_all(d).map_err(|e| StoreError::io("creating", d, e))?;
        }
        let lowers = if parents.is_empty() {
            vec![self.empty_lower()?]
        } else {
            parents.to_vec()
        };
        self.mount(&lowers, Some((&fsd, &work)), &rootfs)?;
        Ok(rootfs)
    }

    fn view(&self, dir: &Path, parents: &[PathBuf]) -> Result<PathBuf> {
        let rootfs = dir.join("rootfs");
        // Without an upper dir overlayfs wants two lowers; the empty dir is the spare.
        let mut lowers = parents.to_vec();
        lowers.push(self.empty_lower()?);
        self.mount(&lowers, None, &rootfs)?;
        Ok(rootfs)
    }

    fn commit(&self, dir: &Path) -> Result<()> {
        let rootfs = dir.join("rootfs");
        sys::unmount(&rootfs).map_err(|e| StoreError::Mount {
            target: rootfs.clone(),
            message: format!("unmounting: {e}"),
        })?;
        let work = dir.join("work");
        match fs::remove_dir_all(&work) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("removing overlay work dir", work, e)),
        }
    }

    fn mounts(&self, dir: &Path, parents: &[PathBuf], writable: bool) -> Vec<Mount> {
        let mut options: Vec<String> = parents
            .iter()
            .map(|p| format!("lowerdir+={}", p.display()))
            .collect();
        if writable {
            options.push(format!("upperdir={}", dir.join("fs").display()));
            options.push(format!("workdir={}", dir.join("work").display()));
        } else {
            options.push("ro".into());
        }
        options.extend(extra_options().iter().map(|(k, v)| {
            if v.is_empty() {
                (*k).to_owned()
            } else {
                format!("{k}={v}")
            }
        }));
        vec![Mount {
            fstype: "overlay".into(),
            source: PathBuf::from("overlay"),
            options,
        }]
    }

    fn diff_source(&self, dir: &Path, _parents: &[PathBuf]) -> DiffSource {
        DiffSource::Upper(dir.join("fs"))
    }

    fn apply_layout(&self) -> ApplyLayout {
        ApplyLayout::OverlayUpper
    }
}
