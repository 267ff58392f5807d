//! Differential tests: the same steps under kiln's own executor and under Debian's `runc`
//! (driven with kiln's generated OCI runtime spec) must leave the same changes in the overlay
//! upper dir and print the same output. Root only; fails when `runc` is missing.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_exec::{
    CacheMountRequest, CacheMounts, CancelToken, CollectedOutput, ExecError, ExecSpec, Executor,
    ExitStatus, MountKind, MountSpec, NamespaceExecutor, Network, RuncExecutor, Secret,
};

/// Fails the calling test unless it runs as root with `runc` installed.
fn require_runc(test: &str) {
    require_root(test);
    require_program("runc");
}

#[derive(Debug, PartialEq)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    upper: BTreeMap<String, String>,
}

/// Runs `make_spec` on a fresh overlay under `exec`.
fn outcome(exec: &dyn Executor, make_spec: &dyn Fn(&std::path::Path) -> ExecSpec) -> Outcome {
    let fs = OverlayRootfs::new();
    let spec = make_spec(&fs.merged);
    let mut out = CollectedOutput::default();
    let status = exec
        .run(&spec, &mut out, &CancelToken::new())
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    Outcome {
        status,
        stdout: out.stdout_text(),
        stderr: out.stderr_text(),
        upper: fs.upper_tree(),
    }
}

fn compare(name: &str, make_spec: &dyn Fn(&std::path::Path) -> ExecSpec) -> Outcome {
    let ours = outcome(&NamespaceExecutor::new(), make_spec);
    let runc = outcome(&RuncExecutor::default(), make_spec);
    assert_eq!(
        ours, runc,
        "step {name:?}: kiln (left) and runc (right) differ"
    );
    ours
}

fn script(s: &'static str) -> impl Fn(&std::path::Path) -> ExecSpec {
    move |root| sh(root, s)
}

#[test]
fn root_same_filesystem_changes_and_output_under_kiln_and_runc() {
    require_runc("root_same_filesystem_changes_and_output_under_kiln_and_runc");
    let o = compare(
        "write/delete/chmod/links",
        &script(
            "set -e
             echo a > /data/new; rm /data/remove.txt; chmod 600 /data/mode.txt
             mkdir -p /opt/x; ln -s /data/keep.txt /opt/x/link; ln /data/keep.txt /opt/x/hard
             chown 1000:50 /opt/x; touch /etc/newconf; rm /etc/motd; mkdir -p /run/app
             echo done",
        ),
    );
    assert!(
        o.upper.contains_key("data/new")
            && o.upper.get("etc/motd").map(String::as_str) == Some("whiteout")
    );
    compare("exit code", &script("echo out; echo err >&2; exit 7"));
    compare(
        "devices, hostname, host files",
        &script("ls /dev; hostname; cat /etc/hosts | wc -l; ls -d /proc/1"),
    );
    compare("confinement", &script("grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status; unshare -m true 2>&1; echo rc=$?; mount -t tmpfs none /mnt 2>&1; echo rc=$?"));
    compare("masked and read-only paths", &script("cat /proc/timer_list /proc/keys 2>/dev/null | wc -c; ls -A /sys/firmware | wc -l; echo 1 > /proc/sysrq-trigger 2>/dev/null; echo rc=$?; touch /sys/x 2>/dev/null; echo rc=$?"));
    compare("rlimits", &script("ulimit -n; ulimit -Hn"));
}

#[test]
fn root_same_user_workdir_and_network_handling_under_kiln_and_runc() {
    require_runc("root_same_user_workdir_and_network_handling_under_kiln_and_runc");
    let as_alice = |root: &std::path::Path| {
        let mut s = sh(
            root,
            "id; pwd; echo $HOME; touch f; grep -E '^Cap(Eff|Bnd)' /proc/self/status",
        );
        s.user = Some("alice".into());
        s.cwd = "/home/alice/work".into();
        s
    };
    let o = compare("USER alice with new workdir", &as_alice);
    assert!(o.upper.contains_key("home/alice/work/f"), "{:?}", o.upper);
    compare("USER uid:gid", &|root: &std::path::Path| {
        let mut s = sh(root, "id");
        s.user = Some("1000:50".into());
        s
    });
    compare("network none", &|root: &std::path::Path| {
        let mut s = sh(root, "ls /sys/class/net; ip -o link show lo | grep -c UP");
        s.network = Network::None;
        s
    });
    compare("security=insecure", &|root: &std::path::Path| {
        let mut s = sh(
            root,
            "grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status; unshare -m true && echo unshared",
        );
        s.privileged = true;
        s
    });
    compare("env", &|root: &std::path::Path| {
        let mut s = sh(root, "echo \"$FOO|$PATH|$HOME\"");
        s.env = vec![("FOO".into(), "bar baz".into())];
        s
    });
}

#[test]
fn root_same_mount_behaviour_under_kiln_and_runc() {
    require_runc("root_same_mount_behaviour_under_kiln_and_runc");
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a.txt"), "original\n").unwrap();
    let state = tempfile::tempdir().unwrap();
    let caches = CacheMounts::new(state.path());
    let src_path = src.path().to_path_buf();
    let make = |cache_dir: std::path::PathBuf| {
        let src_path = src_path.clone();
        move |root: &std::path::Path| {
            let mut s = sh(
                root,
                "cat /run/secrets/s; echo; stat -c '%a %u' /run/secrets/s
                 echo x > /ro/a.txt 2>/dev/null; echo ro-rc=$?
                 echo changed > /rw/a.txt; cat /rw/a.txt
                 n=$(cat /cache/n 2>/dev/null || echo 0); echo $((n+1)) > /cache/n; cat /cache/n
                 grep ' /scratch ' /proc/mounts | grep -o 'size=[0-9a-z]*'",
            );
            s.mounts = vec![
                MountSpec::secret("s", None, Secret::new("pa55word")),
                MountSpec {
                    target: "/ro".into(),
                    kind: MountKind::Bind {
                        source: src_path.clone(),
                        readwrite: false,
                    },
                },
                MountSpec {
                    target: "/rw".into(),
                    kind: MountKind::Bind {
                        source: src_path.clone(),
                        readwrite: true,
                    },
                },
                MountSpec {
                    target: "/cache".into(),
                    kind: MountKind::Cache {
                        source: cache_dir.clone(),
                    },
                },
                MountSpec {
                    target: "/scratch".into(),
                    kind: MountKind::Tmpfs {
                        size: Some(4 << 20),
                    },
                },
            ];
            s
        }
    };
    let ours_cache = caches.acquire(&CacheMountRequest::new("ours")).unwrap();
    let runc_cache = caches.acquire(&CacheMountRequest::new("runc")).unwrap();
    let ours = outcome(
        &NamespaceExecutor::new(),
        &make(ours_cache.path().to_path_buf()),
    );
    let runc = outcome(
        &RuncExecutor::default(),
        &make(runc_cache.path().to_path_buf()),
    );
    assert_eq!(ours, runc);
    assert_eq!(ours.stdout, "****\n400 0\nro-rc=1\nchanged\n1\nsize=4096k");
    assert_eq!(ours.upper, BTreeMap::new(), "no mount residue in the layer");
    assert_eq!(
        std::fs::read_to_string(src.path().join("a.txt")).unwrap(),
        "original\n"
    );
}

#[test]
fn root_runc_backend_reports_cancellation_and_forwards_ssh_mounts() {
    require_runc("root_runc_backend_reports_cancellation_and_forwards_ssh_mounts");
    let fs = OverlayRootfs::new();
    let token = CancelToken::new();
    let t = token.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        t.cancel();
    });
    let err = RuncExecutor::default()
        .run(
            &sh(&fs.merged, "sleep 4712 & sleep 4712"),
            &mut CollectedOutput::default(),
            &token,
        )
        .unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, ExecError::Cancelled), "{err}");
    let fs = OverlayRootfs::new();
    let dir = tempfile::tempdir().unwrap();
    let agent_path = dir.path().join("agent.sock");
    let _agent = std::os::unix::net::UnixListener::bind(&agent_path).unwrap();
    let mut spec = sh(&fs.merged, "stat -c '%F %a %u:%g' /x/agent");
    spec.mounts = vec![MountSpec {
        target: "/x/agent".into(),
        kind: MountKind::Ssh {
            socket: agent_path,
            uid: 33,
            gid: 33,
            mode: 0o600,
        },
    }];
    let mut out = CollectedOutput::default();
    let st = RuncExecutor::default()
        .run(&spec, &mut out, &CancelToken::new())
        .unwrap();
    assert_eq!(st, ExitStatus::Code(0), "{}", out.stderr_text());
    assert_eq!(out.stdout_text(), "socket 600 33:33");
    assert_eq!(
        fs.upper_tree(),
        BTreeMap::new(),
        "the ssh mount point left the layer"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn root_same_seccomp_verdicts_for_an_i386_binary_under_kiln_and_runc() {
    require_runc("root_same_seccomp_verdicts_for_an_i386_binary_under_kiln_and_runc");
    // Debian's runc 1.1 does not apply linux.personality: no `uname -m` here.
    let script = "ls -l / | wc -l; cat /etc/motd; id; dd if=/etc/motd bs=1 skip=1 count=2; echo; \
                  unshare -U true 2>&1; echo unshare-rc=$?";
    let outcome32 = |exec: &dyn Executor| {
        let fs = i386_busybox_overlay();
        let mut spec = sh(&fs.merged, script);
        spec.network = Network::None;
        let mut out = CollectedOutput::default();
        let status = exec
            .run(&spec, &mut out, &CancelToken::new())
            .unwrap_or_else(|e| panic!("run failed: {e}"));
        (status, out.stdout_text())
    };
    let ours = outcome32(&NamespaceExecutor::new());
    let runc = outcome32(&RuncExecutor::default());
    assert_eq!(ours, runc, "kiln (left) and runc (right) differ");
    assert_eq!(ours.0, ExitStatus::Code(0), "{}", ours.1);
    assert!(
        ours.1.contains("hello\nuid=0(root)") && ours.1.contains("\nel\n"),
        "{}",
        ours.1
    );
    assert!(ours.1.contains("unshare-rc=1"), "{}", ours.1);
}
