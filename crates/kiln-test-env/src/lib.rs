//! What kiln's tests need from the machine they run on, checked loudly.
//!
//! Tests drive real parts: containers (root, overlayfs, namespaces), Debian's registry,
//! skopeo, podman, runc. `bash .ci/install` installs all of it; a test that finds something
//! missing fails and says so, it never passes having asserted nothing. podman also needs
//! settings for this machine kind: [`podman_conf`] writes them from `containers.conf` (the
//! file beside this crate's `Cargo.toml`) and the machine's hard rlimits.

/// A 3-node Garage cluster (S3-compatible object store) for the s3 tests.
pub mod garage;
/// Busybox base images for amd64 and arm64 made here, pushed as one index; QEMU emulation.
pub mod multiarch;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What to do when the machine lacks something the tests use; every failure here says it.
pub const INSTALL_HINT: &str =
    "run `bash .ci/install` as root: it installs everything the tests use";

/// podman's fixed settings for this machine kind; [`podman_conf`] appends the rlimits.
pub const PODMAN_SETTINGS: &str = include_str!("../containers.conf");

/// Whether this process runs as root (the tests that run containers need it; CI is root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test unless it runs as root: `what` (a test, or what it uses) needs
/// namespaces, mounts or overlayfs.
#[track_caller]
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what}: needs root (containers, overlayfs, namespaces); run the tests as root, as CI does"
    );
}

/// The path of `program` (a name looked up on `PATH`, or a path); fails the calling test,
/// saying how to install it, when it is not there.
#[track_caller]
pub fn require_program(program: &str) -> PathBuf {
    match find_program(program) {
        Some(path) => path,
        None => panic!("{program} is not installed: {INSTALL_HINT}"),
    }
}

/// The path of `program`: itself when it names a path, else the first executable file of that
/// name on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return is_executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Writes podman's settings for this machine to `dir/containers.conf` and returns that path,
/// for `CONTAINERS_CONF`. Fails the calling test when podman is not installed. Concurrent
/// callers are safe: each call writes a file of its own and renames it into place, and all
/// write the same bytes.
#[track_caller]
pub fn podman_conf(dir: &Path) -> PathBuf {
    require_program("podman");
    write_podman_conf(dir)
}

#[track_caller]
fn write_podman_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("containers.conf");
    // Unique per call, not only per process: tests of one binary run on several threads.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(".containers.conf.{}.{call}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&temp, podman_conf_text()))
        .and_then(|()| std::fs::rename(&temp, &conf));
    if let Err(e) = written {
        panic!("writing podman's settings to {}: {e}", conf.display());
    }
    conf
}

/// The text of podman's settings: [`PODMAN_SETTINGS`] and default ulimits of this process's
/// finite hard limits of `nofile` and `nproc`, `nproc` no higher than the kernel's `pid_max`:
/// podman (4.3) runs the container runtime with that cap (32768 here, where the hard limit
/// is 96367), and runc cannot raise a limit above its own.
pub fn podman_conf_text() -> String {
    let mut text = PODMAN_SETTINGS.to_owned();
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let nproc = match (hard_limit(libc::RLIMIT_NPROC), pid_max) {
        (Some(hard), Some(max)) => Some(hard.min(max)),
        (hard, max) => hard.or(max),
    };
    let limits: Vec<String> = [
        ("nofile", hard_limit(libc::RLIMIT_NOFILE)),
        ("nproc", nproc),
    ]
    .into_iter()
    .filter_map(|(name, limit)| Some(format!("\"{name}={0}:{0}\"", limit?)))
    .collect();
    if !limits.is_empty() {
        let _ = write!(
            text,
            "\n[containers]\ndefault_ulimits = [{}]\n",
            limits.join(", ")
        );
    }
    text
}

/// The hard limit of `resource` for this process; `None` when it is unlimited.
fn hard_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(resource, &mut limit) };
    assert_eq!(
        rc,
        0,
        "getrlimit({resource}): {}",
        std::io::Error::last_os_error()
    );
    (limit.rlim_max != libc::RLIM_INFINITY).then_some(limit.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_settings_carry_the_machine_kind_and_its_hard_limits() {
        let dir = std::env::temp_dir().join(format!("kiln-test-env-unit-{}", std::process::id()));
        let text = podman_conf_text();
        assert!(text.starts_with(PODMAN_SETTINGS), "{text}");
        for line in [
            "runtime = \"runc\"",
            "cgroup_manager = \"cgroupfs\"",
            "events_logger = \"file\"",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        match hard_limit(libc::RLIMIT_NOFILE) {
            Some(n) => assert!(text.contains(&format!("\"nofile={n}:{n}\"")), "{text}"),
            None => assert!(!text.contains("nofile="), "{text}"),
        }
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let nproc = text.split("\"nproc=").nth(1).expect("an nproc ulimit");
        let nproc: u64 = nproc.split(':').next().unwrap().parse().unwrap();
        assert!(nproc <= pid_max, "{text}");
        let conf = write_podman_conf(&dir);
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_fails_naming_the_install_script() {
        assert!(find_program("sh").is_some());
        let err = std::panic::catch_unwind(|| require_program("kiln-no-such-program"))
            .expect_err("a missing program fails");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("kiln-no-such-program is not installed"),
            "{msg}"
        );
        assert!(msg.contains("bash .ci/install"), "{msg}");
    }
}
