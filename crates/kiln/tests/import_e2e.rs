//! `kiln import` is reproducible: two runners importing the same rootfs (a directory or a
//! tar) get the same image digest, so every step built on it gets the same cache keys.
//!
//! Needs root (snapshots keep file owners).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// `kiln import SRC -t base:1` into the state dir `state`, without SOURCE_DATE_EPOCH; the
/// image digest it prints.
fn import(state: &Path, src: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(state)
        .arg("import")
        .arg(src)
        .args(["-t", "base:1"])
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    digest
}

#[test]
fn importing_the_same_rootfs_on_two_runners_gives_the_same_image() {
    assert!(
        is_root(),
        "needs root (file owners in snapshots); CI runs as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    busybox_rootfs(&rootfs);
    std::fs::create_dir_all(rootfs.join("usr/share/deep/er")).unwrap();
    std::fs::write(rootfs.join("usr/share/deep/er/file"), "x\n").unwrap();
    let tar = tmp.path().join("rootfs.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    for src in [&rootfs, &tar] {
        let first = import(&tmp.path().join("runner-a"), src);
        // Let the clock move past a second, as it does between two CI runners.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let second = import(&tmp.path().join("runner-b"), src);
        assert_eq!(first, second, "importing {} twice", src.display());
        std::fs::remove_dir_all(tmp.path().join("runner-a")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("runner-b")).unwrap();
    }
}

#[test]
fn a_source_date_epoch_that_is_not_a_number_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(tmp.path().join("state"))
        .arg("import")
        .arg(&rootfs)
        .args(["-t", "base:1"])
        .env("SOURCE_DATE_EPOCH", "yesterday")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SOURCE_DATE_EPOCH") && stderr.contains("yesterday"),
        "{stderr}"
    );
}
