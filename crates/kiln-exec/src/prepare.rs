//! Host-side preparation shared by both backends: validation, user and command lookup,
//! environment, working dir, mount points.

use std::path::{Path, PathBuf};

use crate::network::isolated_resolv_conf;
use crate::rootfs::{create_workdir, find_command, MountStubs, StubKind};
use crate::spec::{
    wipe, CancelToken, ExecError, ExecSpec, ExitStatus, MountKind, Network, DEFAULT_PATH,
};
use crate::user::{resolve_user, ResolvedUser};

/// Host files bind-mounted (as private copies) into every container.
pub(crate) const HOST_FILES: &[(&str, &str)] =
    &[("/etc/resolv.conf", "resolv.conf"), ("/etc/hosts", "hosts")];

/// A host file to expose at a container path: its content and the mount point's host path.
pub(crate) struct HostFile {
    pub name: &'static str,
    pub content: Vec<u8>,
    pub target: PathBuf,
}

pub(crate) struct Prepared {
    pub root: PathBuf,
    pub user: ResolvedUser,
    pub exe: String,
    pub env: Vec<String>,
    pub stubs: MountStubs,
    pub proc_dir: PathBuf,
    pub dev_dir: PathBuf,
    pub sys_dir: PathBuf,
    pub host_files: Vec<HostFile>,
    /// Host path of each `spec.mounts[i]` target.
    pub mount_targets: Vec<PathBuf>,
    /// Secret values to keep out of the output.
    pub secret_values: Vec<Vec<u8>>,
}

fn validate(spec: &ExecSpec) -> Result<(), ExecError> {
    let bad = |m: String| Err(ExecError::InvalidSpec(m));
    if spec.args.is_empty() || spec.args[0].is_empty() {
        return bad("empty command (args)".into());
    }
    if spec.args.iter().any(|a| a.contains('\0')) {
        return bad("an argument contains a NUL byte".into());
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return bad(format!("invalid environment variable name or value: {k:?}"));
        }
    }
    for (k, _) in &spec.secret_env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return bad(format!("invalid secret env name: {k:?}"));
        }
    }
    if !spec.cwd.starts_with('/') {
        return bad(format!("working dir must be absolute: {:?}", spec.cwd));
    }
    if spec.hostname.len() > 64 || spec.hostname.contains('\0') {
        return bad(format!("invalid hostname {:?}", spec.hostname));
    }
    for (name, _) in &spec.extra_hosts {
        if name.is_empty()
            || name.contains(|c: char| c.is_whitespace() || c.is_control() || c == '#')
        {
            return bad(format!("invalid extra host name {name:?}"));
        }
    }
    if spec.shm_size == Some(0) {
        return bad("the /dev/shm size must be at least one byte".into());
    }
    for m in &spec.mounts {
        if !m.target.starts_with('/') || m.target.contains('\0') {
            return bad(format!(
                "mount target must be an absolute path: {:?}",
                m.target
            ));
        }
        if m.target
            .split('/')
            .all(|c| c.is_empty() || c == "." || c == "..")
        {
            return bad(format!("cannot mount over the root: {:?}", m.target));
        }
        if let MountKind::Ssh = m.kind {
            return Err(ExecError::Unsupported("RUN --mount=type=ssh"));
        }
    }
    Ok(())
}

pub(crate) fn prepare(spec: &ExecSpec) -> Result<Prepared, ExecError> {
    validate(spec)?;
    let root = std::fs::canonicalize(&spec.rootfs).map_err(|e| ExecError::Prepare {
        what: "opening rootfs",
        path: spec.rootfs.clone(),
        source: e,
    })?;
    if !root.is_dir() || root == Path::new("/") {
        return Err(ExecError::InvalidSpec(format!(
            "rootfs must be a directory other than /: {}",
            root.display()
        )));
    }
    let user = resolve_user(&root, spec.user.as_deref())?;
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let has = |k: &str| spec.env.iter().any(|(n, _)| n == k);
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
        .to_string();
    if !has("PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOME") {
        env.push(format!("HOME={}", user.home));
    }
    let mut secret_values = Vec::new();
    for (k, s) in &spec.secret_env {
        let v = String::from_utf8(s.expose().to_vec())
            .map_err(|_| ExecError::InvalidSpec(format!("secret env {k} is not UTF-8")))?;
        if v.contains('\0') {
            return Err(ExecError::InvalidSpec(format!(
                "secret env {k} contains a NUL byte"
            )));
        }
        env.push(format!("{k}={v}"));
        secret_values.push(s.expose().to_vec());
    }
    let exe = find_command(&root, &spec.args[0], &path_var)?;
    create_workdir(&root, &spec.cwd, user.uid, user.gid)?;

    let mut stubs = MountStubs::new(&root);
    let proc_dir = stubs.ensure("/proc", StubKind::Dir)?;
    let dev_dir = stubs.ensure("/dev", StubKind::Dir)?;
    let sys_dir = stubs.ensure("/sys", StubKind::Dir)?;
    let mut host_files = Vec::new();
    for (path, name) in HOST_FILES {
        let read = std::fs::read(path).ok();
        let read = match read {
            None if *name == "hosts" && !spec.extra_hosts.is_empty() => {
                Some(b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec())
            }
            r => r,
        };
        if let Some(mut content) = read {
            if *name == "resolv.conf" && spec.network == Network::Isolated {
                // The host's nameservers may be on its loopback, out of the step's reach.
                content = isolated_resolv_conf(&content);
            }
            if *name == "hosts" {
                add_extra_hosts(&mut content, &spec.extra_hosts);
            }
            let target = stubs.ensure(path, StubKind::File)?;
            host_files.push(HostFile {
                name,
                content,
                target,
            });
        }
    }
    let mut mount_targets = Vec::new();
    for m in &spec.mounts {
        let kind = match &m.kind {
            MountKind::Bind { source, .. } if !source.is_dir() => {
                if !source.exists() {
                    return Err(ExecError::Prepare {
                        what: "bind mount source",
                        path: source.clone(),
                        source: std::io::Error::from_raw_os_error(libc::ENOENT),
                    });
                }
                StubKind::File
            }
            MountKind::Secret { data, .. } => {
                secret_values.push(data.expose().to_vec());
                StubKind::File
            }
            _ => StubKind::Dir,
        };
        mount_targets.push(stubs.ensure(&m.target, kind)?);
    }
    stubs.seal();
    Ok(Prepared {
        root,
        user,
        exe,
        env,
        stubs,
        proc_dir,
        dev_dir,
        sys_dir,
        host_files,
        mount_targets,
        secret_values,
    })
}

/// Appends `--add-host` entries to a hosts file's content, one `ADDR\tNAME` line each.
fn add_extra_hosts(content: &mut Vec<u8>, hosts: &[(String, std::net::IpAddr)]) {
    if hosts.is_empty() {
        return;
    }
    if !content.is_empty() && !content.ends_with(b"\n") {
        content.push(b'\n');
    }
    for (name, addr) in hosts {
        content.extend_from_slice(format!("{addr}\t{name}\n").as_bytes());
    }
}

/// The frame of every backend's run: refuse a cancelled token, prepare the rootfs, run
/// `body`, then always take the mount points back out (a leftover would land in the layer).
pub(crate) fn run_prepared(
    spec: &ExecSpec,
    cancel: &CancelToken,
    body: impl FnOnce(&Prepared) -> Result<ExitStatus, ExecError>,
) -> Result<ExitStatus, ExecError> {
    if cancel.is_cancelled() {
        return Err(ExecError::Cancelled);
    }
    let mut prep = prepare(spec)?;
    let result = body(&prep);
    let cleaned = prep.stubs.remove().map_err(|e| ExecError::Prepare {
        what: "removing mount points from the rootfs",
        path: prep.root.clone(),
        source: e,
    });
    let status = result?;
    cleaned?;
    Ok(status)
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // Secret values (kept for output redaction) and env strings (secret env vars).
        for v in &mut self.secret_values {
            wipe(v);
        }
        for e in &mut self.env {
            // SAFETY: zero bytes keep the String valid UTF-8.
            wipe(unsafe { e.as_mut_vec() });
        }
    }
}

/// A private directory for one run's scratch files (removed by `Drop`).
pub(crate) struct ScratchDir {
    pub path: PathBuf,
}

/// Numbers the scratch dirs of this process.
static NEXT_SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ScratchDir {
    pub(crate) fn new(base: &Path) -> Result<Self, ExecError> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::Ordering;
        // A process killed before its `Drop` ran leaves its dirs behind, and a later process
        // may get the same pid: a name that is taken is skipped, never reused.
        let mut attempts = 0;
        loop {
            let n = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("kiln-exec-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 1000 => {
                    attempts += 1;
                }
                Err(e) => {
                    return Err(ExecError::Prepare {
                        what: "creating scratch dir",
                        path,
                        source: e,
                    })
                }
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn scratch_dir_skips_names_a_killed_process_left_behind() {
        let base = tempfile::tempdir().unwrap();
        let next = NEXT_SCRATCH.load(Ordering::Relaxed);
        // What a killed earlier process with this pid would have left.
        for n in next..next + 20 {
            std::fs::create_dir(
                base.path()
                    .join(format!("kiln-exec-{}-{n}", std::process::id())),
            )
            .unwrap();
        }
        let dir = ScratchDir::new(base.path()).unwrap();
        assert!(dir.path.is_dir());
        assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 21);
    }
}
