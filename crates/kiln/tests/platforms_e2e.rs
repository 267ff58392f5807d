//! `kiln debug platforms` end to end, as root: with binfmt_misc mounted and Debian's
//! qemu-aarch64 handler registered it lists linux/arm64 as emulated; against a directory
//! laid out like binfmt_misc (`KILN_BINFMT_DIR`) without the handler, without the mount,
//! or with a handler lacking the F flag, it prints the exact fix. The host's binfmt_misc
//! state is put back as it was: only what the test added is removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_test_env::require_root;

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";
const AARCH64_CONF: &str = "/usr/lib/binfmt.d/qemu-aarch64.conf";

fn kiln(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).env_remove("KILN_BINFMT_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running kiln")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The line of the `platforms:` table for `name`.
fn row<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"))
}

/// Undoes what the test added to the host's binfmt_misc when dropped.
struct HostBinfmt {
    mounted_here: bool,
    registered_here: bool,
}

impl HostBinfmt {
    /// Mounts binfmt_misc and registers qemu-aarch64 (with Debian's handler file) unless
    /// they already are.
    fn ensure_aarch64() -> HostBinfmt {
        let mut g = HostBinfmt {
            mounted_here: false,
            registered_here: false,
        };
        if !Path::new(BINFMT).join("status").exists() {
            let st = Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT])
                .status()
                .unwrap();
            assert!(st.success(), "mounting binfmt_misc at {BINFMT}");
            g.mounted_here = true;
        }
        if !Path::new(BINFMT).join("qemu-aarch64").exists() {
            let line = std::fs::read_to_string(AARCH64_CONF).unwrap_or_else(|e| {
                panic!("{AARCH64_CONF}: {e}: install qemu-user-static (see .ci/install)")
            });
            std::fs::write(Path::new(BINFMT).join("register"), line.trim_end())
                .expect("registering qemu-aarch64");
            g.registered_here = true;
        }
        g
    }
}

impl Drop for HostBinfmt {
    fn drop(&mut self) {
        if self.registered_here {
            let _ = std::fs::write(Path::new(BINFMT).join("qemu-aarch64"), "-1");
        }
        if self.mounted_here {
            let _ = Command::new("umount").arg(BINFMT).status();
        }
    }
}

#[test]
fn registered_aarch64_handler_is_listed_as_emulated() {
    require_root("platforms_e2e");
    let _host = HostBinfmt::ensure_aarch64();
    let out = stdout(&kiln(&["debug", "platforms"], &[]));
    assert!(out.contains("native:      linux/amd64"), "{out}");
    let emulated = out.lines().find(|l| l.starts_with("emulated:")).unwrap();
    assert!(emulated.contains("linux/arm64 (qemu-aarch64)"), "{out}");
    assert!(
        row(&out, "linux/arm64").contains("yes (emulated: qemu-aarch64)"),
        "{out}"
    );

    let json: serde_json::Value = serde_json::from_str(&stdout(&kiln(
        &["debug", "platforms", "--format", "json"],
        &[],
    )))
    .unwrap();
    assert!(json["emulated"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "linux/arm64"));
    let h = json["binfmt_misc"]["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "qemu-aarch64")
        .unwrap();
    assert_eq!(h["fix_binary"], true);
    assert_eq!(h["platform"], "linux/arm64");
}

/// A directory laid out like binfmt_misc, holding the host's own qemu-aarch64 handler text
/// with its flags replaced by `flags` (or no handler when `None`).
fn fake_binfmt(dir: &Path, aarch64_flags: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("status"), "enabled\n").unwrap();
    std::fs::write(dir.join("register"), "").unwrap();
    if let Some(flags) = aarch64_flags {
        let text = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n".to_owned()
            + &format!("flags: {flags}\noffset 0\n")
            + "magic 7f454c460201010000000000000000000200b700\n"
            + "mask ffffffffffffff00fffffffffffffffffeffffff\n";
        std::fs::write(dir.join("qemu-aarch64"), text).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn missing_handler_mount_or_fix_binary_flag_prints_the_fix() {
    let tmp = tempfile::tempdir().unwrap();

    let no_handler = fake_binfmt(&tmp.path().join("no-handler"), None);
    let out = stdout(&kiln(
        &["debug", "platforms"],
        &[("KILN_BINFMT_DIR", &no_handler)],
    ));
    let arm64 = row(&out, "linux/arm64");
    assert!(arm64.contains("no: "), "{out}");
    assert!(arm64.contains("apt-get install qemu-user-static"), "{out}");
    assert!(
        arm64.contains("/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf"),
        "{out}"
    );
    assert!(out.contains("emulated:    none"), "{out}");

    let unmounted = tmp.path().join("unmounted");
    std::fs::create_dir_all(&unmounted).unwrap();
    let out = stdout(&kiln(
        &["debug", "platforms"],
        &[("KILN_BINFMT_DIR", &unmounted)],
    ));
    assert!(
        row(&out, "linux/arm64").contains(&format!(
            "mount -t binfmt_misc binfmt_misc {}",
            unmounted.display()
        )),
        "{out}"
    );

    let no_f = fake_binfmt(&tmp.path().join("no-f"), Some("PO"));
    let json: serde_json::Value = serde_json::from_str(&stdout(&kiln(
        &["debug", "platforms", "--format", "json"],
        &[("KILN_BINFMT_DIR", &no_f)],
    )))
    .unwrap();
    let arm64 = json["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["platform"] == "linux/arm64")
        .unwrap();
    assert_eq!(arm64["can_run"], false);
    let fix = arm64["fix"].as_str().unwrap();
    assert!(
        fix.contains("F (fix-binary)") && fix.contains("echo -1 >"),
        "{fix}"
    );
}
