//! The second backend: Debian's `runc` driven with a generated OCI runtime spec expressing the
//! same settings as [`crate::NamespaceExecutor`]. Used by the differential tests; slower to
//! start (runc is a Go program that re-executes itself).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::namespace::{overlay_escape, MASKED_PATHS, READONLY_PATHS};
use crate::network::NetworkPool;
use crate::output::supervise;
#[cfg(test)]
use crate::prepare::prepare;
use crate::prepare::{run_prepared, Prepared, ScratchDir};
use crate::security::{
    allowed_syscalls, current_permitted, last_cap, personalities, ALL_CAP_NAMES, CLONE_NS_FLAGS,
    DEFAULT_CAPS,
};
use crate::spec::{
    CancelToken, ExecError, ExecSpec, Executor, ExitStatus, MountKind, Network, OutputSink,
};

/// Runs steps with `runc run` (exit codes above 128 are runc's `128 + signal`, so signal deaths
/// are reported as [`ExitStatus::Code`]). Isolated steps join a network from the same kind of
/// pool as [`crate::NamespaceExecutor`]'s.
#[derive(Debug, Clone)]
pub struct RuncExecutor {
    runc: PathBuf,
    networks: Arc<NetworkPool>,
    pids_limit: Option<u64>,
}

impl Default for RuncExecutor {
    fn default() -> Self {
        Self::new("runc")
    }
}

impl RuncExecutor {
    /// Uses the `runc` binary at `runc` (a path, or a name looked up in `PATH`).
    pub fn new(runc: impl Into<PathBuf>) -> Self {
        RuncExecutor {
            runc: runc.into(),
            networks: Arc::default(),
            pids_limit: None,
        }
    }

    /// Limits every run to `limit` processes (`linux.resources.pids.limit`; runc makes the
    /// cgroup). `None`: no limit, the default.
    pub fn with_pids_limit(mut self, limit: Option<u64>) -> Self {
        self.pids_limit = limit;
        self
    }
}

fn cs(p: &Path) -> Result<CString, ExecError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ExecError::InvalidSpec(format!("NUL byte in path {}", p.display())))
}

/// A tmpfs mounted on the host for one run's secrets and private copies; unmounted on drop.
struct HostTmpfs {
    path: PathBuf,
}

impl HostTmpfs {
    fn mount(path: PathBuf) -> Result<Self, ExecError> {
        std::fs::create_dir_all(&path).map_err(|e| ExecError::Prepare {
            what: "creating tmpfs dir",
            path: path.clone(),
            source: e,
        })?;
        let c = cs(&path)?;
        // SAFETY: valid C strings.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(ExecError::Prepare {
                what: "mounting tmpfs",
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(HostTmpfs { path })
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        if let Ok(c) = cs(&self.path) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn write_private(path: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), ExecError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let prep = |e| ExecError::Prepare {
        what: "writing",
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(prep)?;
    std::io::Write::write_all(&mut f, data).map_err(prep)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(prep)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(prep)?;
    Ok(())
}

fn seccomp_json() -> Value {
    // libseccomp resolves each name per listed arch, skipping arches without the call.
    let names: Vec<&str> = allowed_syscalls()
        .map(|(n, _)| n)
        .chain(crate::security::compat_only_syscalls().iter().copied())
        .collect();
    let mut syscalls = vec![json!({ "names": names, "action": "SCMP_ACT_ALLOW" })];
    syscalls.push(json!({
        "names": ["clone"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{ "index": 0, "value": CLONE_NS_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" }],
    }));
    for p in personalities() {
        syscalls.push(json!({
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{ "index": 0, "value": p, "op": "SCMP_CMP_EQ" }],
        }));
    }
    syscalls
        .push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }));
    let arches: &[&str] = if cfg!(target_arch = "x86_64") {
        // 32-bit x86 processes (linux/386 steps) get the same profile, as in the namespace
        // executor's arch dispatch.
        &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    } else {
        &["SCMP_ARCH_AARCH64"]
    };
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": arches,
        "syscalls": syscalls,
    })
}

/// The OCI runtime spec for `spec`; `private` is a host tmpfs for copies and secrets, `netns`
/// the path of the isolated network to join.
fn runtime_spec(
    spec: &ExecSpec,
    prep: &Prepared,
    private: &Path,
    netns: Option<&Path>,
    pids_limit: Option<u64>,
) -> Result<Value, ExecError> {
    let sandbox = !spec.privileged;
    let caps: Vec<&str> = if sandbox {
        DEFAULT_CAPS.iter().map(|(n, _)| *n).collect()
    } else {
        // Every capability kiln itself holds: runc cannot grant more.
        let have = current_permitted();
        ALL_CAP_NAMES
            .iter()
            .enumerate()
            .take(last_cap() as usize + 1)
            .filter(|(i, _)| have & (1u64 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    };
    // As in kiln's executor: leaving uid 0 clears the effective and permitted sets.
    let live: Vec<&str> = if prep.user.uid == 0 {
        caps.clone()
    } else {
        Vec::new()
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={}", crate::namespace::shm_size_option(spec.shm_size))]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": if sandbox { vec!["nosuid", "noexec", "nodev", "ro"] } else { vec!["nosuid", "noexec", "nodev"] }}),
    ];
    for hf in &prep.host_files {
        let copy = private.join(hf.name);
        write_private(&copy, &hf.content, 0o644, 0, 0)?;
        let dest = format!(
            "/{}",
            hf.target
                .strip_prefix(&prep.root)
                .unwrap_or(&hf.target)
                .display()
        );
        mounts.push(
            json!({"destination": dest, "type": "bind", "source": copy, "options": ["bind", "rw"]}),
        );
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        let dest = &m.target;
        let mount = match &m.kind {
            MountKind::Bind {
                source,
                readwrite: false,
            } => {
                json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "ro"]})
            }
            MountKind::Bind {
                source,
                readwrite: true,
            } if source.is_dir() => {
                let upper = private.join(format!("bind{i}-upper"));
                let work = private.join(format!("bind{i}-work"));
                for d in [&upper, &work] {
                    std::fs::create_dir(d).map_err(|e| ExecError::Prepare {
                        what: "creating",
                        path: d.clone(),
                        source: e,
                    })?;
                }
                json!({"destination": dest, "type": "overlay", "source": "overlay", "options": [
                    format!("lowerdir={}", overlay_escape(source)),
                    format!("upperdir={}", overlay_escape(&upper)),
                    format!("workdir={}", overlay_escape(&work)),
                ]})
            }
            MountKind::Bind {
                source,
                readwrite: true,
            } => {
                use std::os::unix::fs::MetadataExt;
                let read = |e| ExecError::Prepare {
                    what: "reading bind mount source",
                    path: source.clone(),
                    source: e,
                };
                let data = std::fs::read(source).map_err(read)?;
                let meta = std::fs::metadata(source).map_err(read)?;
                let copy = private.join(format!("bind{i}-file"));
                write_private(&copy, &data, meta.mode(), meta.uid(), meta.gid())?;
                json!({"destination": dest, "type": "bind", "source": copy, "options": ["bind", "rw"]})
            }
            MountKind::Cache { source } => {
                json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rw"]})
            }
            MountKind::Tmpfs { size } => {
                let mut o = vec![
                    "nosuid".to_string(),
                    "nodev".to_string(),
                    "mode=1777".to_string(),
                ];
                if let Some(s) = size {
                    o.push(format!("size={s}"));
                }
                json!({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": o})
            }
            MountKind::Secret {
                data,
                mode,
                uid,
                gid,
            } => {
                let file = private.join(format!("secret{i}"));
                write_private(&file, data.expose(), *mode, *uid, *gid)?;
                json!({"destination": dest, "type": "bind", "source": file, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
            }
            MountKind::Ssh { .. } => {
                let socket = prep.ssh_socket(i)?;
                json!({"destination": dest, "type": "bind", "source": socket, "options": ["bind", "nosuid", "nodev", "noexec"]})
            }
        };
        mounts.push(mount);
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match (spec.network, netns) {
        (Network::None, _) => namespaces.push(json!({"type": "network"})),
        (Network::Isolated, Some(path)) => {
            namespaces.push(json!({"type": "network", "path": path}));
        }
        (Network::Isolated, None) => {
            return Err(ExecError::Network(
                "an isolated step needs a network namespace".into(),
            ))
        }
        (Network::Host, _) => {}
    }
    let mut rlimits = Vec::new();
    for rl in &spec.rlimits {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        if unsafe { libc::getrlimit(rl.resource.raw(), &mut cur) } != 0 {
            continue;
        }
        let hard = rl.hard.min(cur.rlim_max);
        rlimits
            .push(json!({"type": rl.resource.oci_name(), "hard": hard, "soft": rl.soft.min(hard)}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "rootfsPropagation": "private",
        "resources": {"devices": [{"allow": false, "access": "rwm"}]},
    });
    if let Some(limit) = pids_limit {
        linux["resources"]["pids"] = json!({ "limit": limit });
    }
    // runc applies `linux.personality` from 1.2 on; older ones (Debian 12's 1.1) ignore it.
    if let Some(domain) = spec.personality.oci_domain() {
        linux["personality"] = json!({ "domain": domain });
    }
    if sandbox {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
        linux["seccomp"] = seccomp_json();
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": prep.user.uid, "gid": prep.user.gid, "additionalGids": prep.user.groups},
            "args": spec.args,
            "env": prep.env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": live, "permitted": live, "inheritable": [], "ambient": []},
            "rlimits": rlimits,
            "noNewPrivileges": sandbox,
        },
        "root": {"path": prep.root, "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

fn runc_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect();
    (!msgs.is_empty()).then(|| msgs.join("; "))
}

impl Executor for RuncExecutor {
    fn run(
        &self,
        spec: &ExecSpec,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<ExitStatus, ExecError> {
        run_prepared(spec, cancel, |prep| {
            let network = match spec.network {
                Network::Isolated => Some(self.networks.acquire()?),
                Network::Host | Network::None => None,
            };
            // runc opens the path itself: name the fd through kiln's pid.
            let netns = network.as_ref().map(|n| {
                PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), n.netns_fd()))
            });
            let result = self.run_in_bundle(spec, prep, sink, cancel, netns.as_deref());
            if let Some(net) = network {
                self.networks.release(net, !spec.privileged);
            }
            result
        })
    }
}

impl RuncExecutor {
    fn run_in_bundle(
        &self,
        spec: &ExecSpec,
        prep: &Prepared,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
        netns: Option<&Path>,
    ) -> Result<ExitStatus, ExecError> {
        let bundle = ScratchDir::new(&std::env::temp_dir())?;
        let private = HostTmpfs::mount(bundle.path.join("private"))?;
        let config = runtime_spec(spec, prep, &private.path, netns, self.pids_limit)?;
        let config_path = bundle.path.join("config.json");
        let body = serde_json::to_vec_pretty(&config)
            .map_err(|e| ExecError::InvalidSpec(e.to_string()))?;
        std::fs::write(&config_path, body).map_err(|e| ExecError::Prepare {
            what: "writing",
            path: config_path.clone(),
            source: e,
        })?;
        let state = bundle.path.join("state");
        let log = bundle.path.join("runc.log");
        let id = bundle
            .path
            .file_name()
            .map_or_else(|| "kiln".to_string(), |n| n.to_string_lossy().into_owned());
        let mut child = Command::new(&self.runc)
            .arg("--root")
            .arg(&state)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--bundle")
            .arg(&bundle.path)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Out of kiln's process group: runc forwards the signals it gets to the container,
            // and a terminal's Ctrl-C is for kiln, which cancels and kills the container itself.
            .process_group(0)
            .spawn()
            .map_err(|e| ExecError::Spawn {
                what: "starting runc",
                source: e,
            })?;
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ExecError::Runc("runc's output pipes are missing".into()));
        };
        let pid = child.id() as libc::pid_t;
        let runc = self.runc.clone();
        let mut kill = || {
            let _ = Command::new(&runc)
                .arg("--root")
                .arg(&state)
                .args(["kill", &id, "KILL"])
                .output();
        };
        let supervised = supervise(
            pid,
            OwnedFd::from(out),
            OwnedFd::from(err),
            sink,
            cancel,
            &prep.secret_values,
            &mut kill,
        );
        let sup = match supervised {
            Ok(sup) => sup,
            Err(e) => {
                kill();
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let _ = Command::new(&self.runc)
            .arg("--root")
            .arg(&state)
            .args(["delete", "-f", &id])
            .output();
        drop(private);
        if sup.cancelled {
            return Err(ExecError::Cancelled);
        }
        let st = sup.wait_status;
        if libc::WIFSIGNALED(st) {
            return Err(ExecError::Runc(format!(
                "runc was killed by signal {}",
                libc::WTERMSIG(st)
            )));
        }
        let code = libc::WEXITSTATUS(st);
        if code != 0 {
            if let Some(msg) = runc_error(&log) {
                return Err(ExecError::Runc(msg));
            }
        }
        Ok(ExitStatus::Code(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_spec_expresses_namespaces_caps_masks_and_seccomp() {
        let r = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(r.path().join("bin")).unwrap();
        std::fs::write(r.path().join("bin/sh"), "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            r.path().join("bin/sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mut spec = ExecSpec::new(r.path(), vec!["sh".into(), "-c".into(), "true".into()]);
        spec.network = Network::None;
        spec.user = Some("1000:1000".into());
        let mut prep = prepare(&spec).unwrap();
        let private = tempfile::tempdir().unwrap();
        let v = runtime_spec(&spec, &prep, private.path(), None, Some(64)).unwrap();
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 64);
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(
            v["process"]["capabilities"]["effective"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            v["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        let clone = &v["linux"]["seccomp"]["syscalls"][1];
        assert_eq!(clone["names"][0], "clone");
        assert_eq!(clone["args"][0]["value"], CLONE_NS_FLAGS);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                v["linux"]["seccomp"]["architectures"],
                json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
            );
            let names = v["linux"]["seccomp"]["syscalls"][0]["names"]
                .as_array()
                .unwrap();
            assert!(names.contains(&json!("_llseek")) && names.contains(&json!("uname")));
        }
        // The host's own execution domain unless the step asks for another.
        assert!(v["linux"].get("personality").is_none());
        spec.personality = crate::Personality::Linux32;
        let private = tempfile::tempdir().unwrap();
        let v = runtime_spec(&spec, &prep, private.path(), None, Some(64)).unwrap();
        assert_eq!(v["linux"]["personality"]["domain"], "LINUX32");
        prep.stubs.remove().unwrap();
    }
}
