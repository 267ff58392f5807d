//! kiln's own executor on a real busybox overlay rootfs. Every test needs root (namespaces,
//! mounts) and fails otherwise; CI runs as root.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use kiln_exec::{
    CacheMountRequest, CacheMounts, CacheSharing, CancelToken, CollectedOutput, ExecError,
    ExecSpec, Executor, ExitStatus, MountKind, MountSpec, NamespaceExecutor, Network, OutputLine,
    OutputSink, Secret,
};

fn exec() -> NamespaceExecutor {
    NamespaceExecutor::new()
}

fn expect_ok(status: ExitStatus, out: &CollectedOutput) {
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout_text(),
        out.stderr_text()
    );
}

fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn root_run_leaves_exactly_its_writes_deletes_and_chmods_in_the_upper_dir() {
    require_root("root_run_leaves_exactly_its_writes_deletes_and_chmods_in_the_upper_dir");
    let fs = OverlayRootfs::new();
    let state = tempfile::tempdir().unwrap();
    let cache = CacheMounts::new(state.path())
        .acquire(&CacheMountRequest::new("apt"))
        .unwrap();
    let mut spec = sh(
        &fs.merged,
        "set -e
         echo new > /data/new.txt
         rm /data/remove.txt
         chmod 600 /data/mode.txt
         mkdir -p /opt/app && echo app > /opt/app/run
         ln -s ../data/keep.txt /opt/link
         cat /etc/resolv.conf /etc/hosts /run/secrets/token > /dev/null
         ls /proc/self /dev/null /sys/class > /dev/null
         echo cached > /var/cache/apt/x; echo scratch > /scratch/y",
    );
    spec.mounts = vec![
        MountSpec::secret("token", None, Secret::new("s3cr3t")),
        MountSpec {
            target: "/var/cache/apt".into(),
            kind: MountKind::Cache {
                source: cache.path().to_path_buf(),
            },
        },
        MountSpec {
            target: "/scratch".into(),
            kind: MountKind::Tmpfs {
                size: Some(1 << 20),
            },
        },
    ];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(
        fs.upper_tree(),
        map(&[
            ("data", "dir 755 0:0"),
            ("data/mode.txt", "file 600 0:0 mode"),
            ("data/new.txt", "file 644 0:0 new"),
            ("data/remove.txt", "whiteout"),
            ("opt", "dir 755 0:0"),
            ("opt/app", "dir 755 0:0"),
            ("opt/app/run", "file 644 0:0 app"),
            ("opt/link", "link -> ../data/keep.txt"),
        ]),
        "no resolv.conf, hosts, /proc, /dev, /sys, /run/secrets, cache or tmpfs residue"
    );
    assert_eq!(
        std::fs::read_to_string(cache.path().join("x")).unwrap(),
        "cached\n"
    );
}

#[test]
fn root_existing_mount_points_in_lower_stay_untouched() {
    require_root("root_existing_mount_points_in_lower_stay_untouched");
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    busybox_rootfs(&lower);
    for d in ["proc", "dev", "sys", "run/secrets"] {
        std::fs::create_dir_all(lower.join(d)).unwrap();
    }
    std::fs::write(lower.join("etc/hosts"), "").unwrap();
    std::os::unix::fs::symlink("../run/resolv.conf", lower.join("etc/resolv.conf")).unwrap();
    let fs = OverlayRootfs::with_lower(dir, lower);
    let mut spec = sh(
        &fs.merged,
        "grep -q . /etc/resolv.conf && cat /run/secrets/a",
    );
    spec.mounts = vec![MountSpec::secret("a", None, Secret::new("x"))];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(fs.upper_tree(), BTreeMap::new());
}

#[test]
fn root_host_resolv_conf_and_hosts_are_private_copies() {
    require_root("root_host_resolv_conf_and_hosts_are_private_copies");
    let fs = OverlayRootfs::new();
    let host_hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    let (st, out) = run(
        &exec(),
        &sh(
            &fs.merged,
            "cat /etc/hosts; echo '10.9.9.9 kiln-test-only' >> /etc/hosts",
        ),
    );
    expect_ok(st, &out);
    assert_eq!(out.stdout_text(), host_hosts.trim_end_matches('\n'));
    assert_eq!(
        std::fs::read_to_string("/etc/hosts").unwrap(),
        host_hosts,
        "host file unchanged"
    );
    assert_eq!(fs.upper_tree(), BTreeMap::new());
}

#[test]
fn root_cache_mount_persists_across_runs_and_never_reaches_the_layer() {
    require_root("root_cache_mount_persists_across_runs_and_never_reaches_the_layer");
    let state = tempfile::tempdir().unwrap();
    let caches = CacheMounts::new(state.path().join("cache-mounts"));
    let mut req = CacheMountRequest::new("/root/.cache");
    req.uid = 1000;
    req.gid = 1000;
    req.mode = 0o750;
    for round in 1..=3 {
        let fs = OverlayRootfs::new();
        let cache = caches.acquire(&req).unwrap();
        let mut spec = sh(
            &fs.merged,
            "n=$(cat /root/.cache/count 2>/dev/null || echo 0); echo $((n+1)) > /root/.cache/count; cat /root/.cache/count; stat -c '%u:%g %a' /root/.cache",
        );
        spec.mounts = vec![MountSpec {
            target: "/root/.cache".into(),
            kind: MountKind::Cache {
                source: cache.path().to_path_buf(),
            },
        }];
        let (st, out) = run(&exec(), &spec);
        expect_ok(st, &out);
        assert_eq!(out.stdout_text(), format!("{round}\n1000:1000 750"));
        assert_eq!(
            fs.upper_tree(),
            BTreeMap::new(),
            "round {round}: cache content stays out of the layer"
        );
    }
}

#[test]
fn root_locked_cache_sharing_serializes_two_concurrent_runs() {
    require_root("root_locked_cache_sharing_serializes_two_concurrent_runs");
    let state = tempfile::tempdir().unwrap();
    let caches = Arc::new(CacheMounts::new(state.path()));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let caches = caches.clone();
            std::thread::spawn(move || {
                let fs = OverlayRootfs::new();
                let mut req = CacheMountRequest::new("locked");
                req.sharing = CacheSharing::Locked;
                let cache = caches.acquire(&req).unwrap();
                let mut spec = sh(
                    &fs.merged,
                    &format!("echo start {i} >> /c/log; sleep 0.3; echo end {i} >> /c/log"),
                );
                spec.mounts = vec![MountSpec {
                    target: "/c".into(),
                    kind: MountKind::Cache {
                        source: cache.path().to_path_buf(),
                    },
                }];
                let (st, out) = run(&NamespaceExecutor::new(), &spec);
                expect_ok(st, &out);
                cache.path().to_path_buf()
            })
        })
        .collect();
    let paths: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(paths[0], paths[1], "locked sharing uses one directory");
    let log = std::fs::read_to_string(paths[0].join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    // Each run's start is directly followed by its own end: the runs never overlapped.
    for pair in lines.chunks(2) {
        let a = pair[0].strip_prefix("start ").unwrap();
        let b = pair[1].strip_prefix("end ").unwrap();
        assert_eq!(a, b, "interleaved runs:\n{log}");
    }
}

#[test]
fn root_secret_is_readable_in_the_step_but_not_in_the_layer_output_or_debug() {
    require_root("root_secret_is_readable_in_the_step_but_not_in_the_layer_output_or_debug");
    let value = "tok-3f9a7c1e-very-secret";
    let fs = OverlayRootfs::new();
    let spec_script =
        "test \"$(cat /run/secrets/npm)\" = \"$NPM_TOKEN\" && echo readable ${#NPM_TOKEN}
             stat -c '%a %u:%g' /run/secrets/npm
             ! echo x > /run/secrets/npm
             echo deliberately: $NPM_TOKEN";
    let mut spec = sh(&fs.merged, spec_script);
    let mut secret = MountSpec::secret("npm", None, Secret::new(value));
    if let MountKind::Secret { mode, uid, .. } = &mut secret.kind {
        *mode = 0o440;
        *uid = 1000;
    }
    spec.mounts = vec![secret];
    spec.secret_env = vec![("NPM_TOKEN".into(), Secret::new(value))];
    let debug = format!("{spec:?}");
    assert!(
        !debug.contains(value),
        "Debug of the spec shows the secret: {debug}"
    );
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    let text = format!("{}\n{}", out.stdout_text(), out.stderr_text());
    assert!(
        text.contains(&format!("readable {}", value.len())),
        "{text}"
    );
    assert!(text.contains("440 1000:0"), "{text}");
    assert!(text.contains("deliberately: ****"), "{text}");
    assert!(!text.contains(value), "secret leaked into output: {text}");
    assert!(
        out.secret_redacted,
        "caller must be told the step printed a secret"
    );
    assert_eq!(fs.upper_tree(), BTreeMap::new());
    // Nothing in the upper dir holds the bytes.
    for (path, desc) in tree(&fs.upper).iter() {
        assert!(!desc.contains(value), "secret found in {path}");
    }
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn root_network_none_has_only_loopback_and_cannot_reach_the_host() {
    require_root("root_network_none_has_only_loopback_and_cannot_reach_the_host");
    let (l, port) = listener();
    let fs = OverlayRootfs::new();
    let mut spec = sh(
        &fs.merged,
        &format!("ls /sys/class/net; ip -o link show lo | grep -q 'UP' && echo lo-up; echo hi | nc -w 2 127.0.0.1 {port} && echo connected || echo refused"),
    );
    spec.network = Network::None;
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(out.stdout_text(), "lo\nlo-up\nrefused");
    drop(l);
}

#[test]
fn root_host_network_reaches_a_listener_on_host_loopback() {
    require_root("root_host_network_reaches_a_listener_on_host_loopback");
    let (l, port) = listener();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        got
    });
    let fs = OverlayRootfs::new();
    let mut spec = sh(
        &fs.merged,
        &format!("echo hello-from-step | nc -w 5 127.0.0.1 {port}"),
    );
    spec.network = Network::Host;
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(server.join().unwrap(), "hello-from-step\n");
}

#[test]
fn root_process_sees_only_its_own_processes_and_no_host_mounts() {
    require_root("root_process_sees_only_its_own_processes_and_no_host_mounts");
    let fs = OverlayRootfs::new();
    let script = "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo
                  ps -o pid,comm | tail -n +2 | wc -l
                  cat /proc/mounts
                  ls /dev | tr '\\n' ' '; echo
                  mount -t tmpfs none /mnt 2>&1 && echo MOUNTED
                  mount --bind / /mnt 2>&1 && echo MOUNTED
                  mount $HOST_DISK /mnt 2>&1 && echo MOUNTED
                  mknod /tmp/disk b $DISK_MAJOR $DISK_MINOR && head -c 512 /tmp/disk > /dev/null && echo READ-HOST-DISK
                  mknod /dev/disk b $DISK_MAJOR $DISK_MINOR && head -c 512 /dev/disk > /dev/null && echo READ-HOST-DISK
                  mknod /tmp/fuse c 10 229 && (exec 3<> /tmp/fuse) && echo OPENED-HOST-DEVICE
                  mknod /dev/fuse c 10 229 && (exec 3<> /dev/fuse) && echo OPENED-HOST-DEVICE
                  rm -f /tmp/disk /tmp/fuse
                  ls /dev/sd* /dev/vd* /dev/nvme* 2>/dev/null; true";
    let (disk, major, minor) = host_root_disk();
    let mut spec = sh(&fs.merged, script);
    spec.env = vec![
        ("HOST_DISK".into(), disk),
        ("DISK_MAJOR".into(), major.to_string()),
        ("DISK_MINOR".into(), minor.to_string()),
    ];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    let stdout = out.stdout_text();
    assert!(
        !stdout.contains("READ-HOST-DISK"),
        "a created device node opened the host disk:\n{stdout}"
    );
    // CAP_MKNOD is in Docker's set and there is no device cgroup: nodev mounts must stop it.
    assert!(
        !stdout.contains("OPENED-HOST-DEVICE"),
        "a created device node opened a host device:\n{stdout}"
    );
    let mut lines = stdout.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.contains(&1) && pids.iter().all(|p| *p < 100),
        "host pids visible: {pids:?}"
    );
    let ps_count: usize = lines.next().unwrap().trim().parse().unwrap();
    assert!(ps_count <= 6, "ps shows {ps_count} processes:\n{stdout}");
    let host_root = fs.merged.to_string_lossy().into_owned();
    assert!(
        !stdout.contains(&host_root),
        "host path of the rootfs visible in /proc/mounts:\n{stdout}"
    );
    assert!(!stdout.contains("MOUNTED"), "mount succeeded:\n{stdout}");
    assert!(out.stderr_text().is_empty() || !out.stderr_text().contains("MOUNTED"));
    let dev_line = stdout
        .lines()
        .find(|l| l.starts_with("fd full"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        dev_line.trim(),
        "fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
}

/// The block device holding the host's `/` (path, major, minor), from mountinfo.
fn host_root_disk() -> (String, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.get(4) == Some(&"/") {
            if let Some(src) = line.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1)) {
                if let Ok(m) = std::fs::metadata(src) {
                    let rdev = m.rdev();
                    return (src.to_string(), libc::major(rdev), libc::minor(rdev));
                }
            }
        }
    }
    let dev = std::fs::metadata("/").unwrap().dev();
    ("/dev/root".to_string(), libc::major(dev), libc::minor(dev))
}

fn status_field(out: &CollectedOutput, name: &str) -> String {
    out.stdout_text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} missing: {}", out.stdout_text()))
        .trim()
        .to_string()
}

#[test]
fn root_capabilities_no_new_privs_and_seccomp_match_docker_defaults() {
    require_root("root_capabilities_no_new_privs_and_seccomp_match_docker_defaults");
    let fs = OverlayRootfs::new();
    let (st, out) = run(&exec(), &sh(&fs.merged, "cat /proc/self/status"));
    expect_ok(st, &out);
    let fs = OverlayRootfs::new();
    assert_eq!(status_field(&out, "CapEff"), "00000000a80425fb");
    assert_eq!(status_field(&out, "CapPrm"), "00000000a80425fb");
    assert_eq!(status_field(&out, "CapBnd"), "00000000a80425fb");
    assert_eq!(status_field(&out, "CapInh"), "0000000000000000");
    assert_eq!(status_field(&out, "NoNewPrivs"), "1");
    assert_eq!(status_field(&out, "Seccomp"), "2");

    let mut spec = sh(&fs.merged, "cat /proc/self/status");
    spec.user = Some("alice".into());
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(
        status_field(&out, "CapEff"),
        "0000000000000000",
        "non-root gets no effective caps"
    );
    assert_eq!(status_field(&out, "CapBnd"), "00000000a80425fb");
}

#[test]
fn root_insecure_security_grants_all_caps_and_no_seccomp() {
    require_root("root_insecure_security_grants_all_caps_and_no_seccomp");
    let fs = OverlayRootfs::new();
    let mut spec = sh(
        &fs.merged,
        "cat /proc/self/status; unshare -m true && echo unshared",
    );
    spec.privileged = true;
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(status_field(&out, "Seccomp"), "0");
    let eff = u64::from_str_radix(&status_field(&out, "CapEff"), 16).unwrap();
    assert_ne!(eff & (1 << 21), 0, "CAP_SYS_ADMIN expected under insecure");
    assert!(out.stdout_text().contains("unshared"));
}

#[test]
fn root_seccomp_blocks_unshare_and_setns_from_busybox() {
    require_root("root_seccomp_blocks_unshare_and_setns_from_busybox");
    let fs = OverlayRootfs::new();
    let (st, out) = run(
        &exec(),
        &sh(
            &fs.merged,
            "unshare -m true 2>&1; echo rc=$?; nsenter -t 1 -m true 2>&1; echo rc=$?",
        ),
    );
    expect_ok(st, &out);
    let text = out.stdout_text();
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(!text.contains("rc=0"), "{text}");
}

/// Not a test of its own: the body of the syscall probe run inside a container by
/// `root_seccomp_blocks_keyctl_ptrace_bpf_and_namespace_clones` (it re-runs this test binary).
#[test]
fn syscall_probe_inside_container() {
    if std::env::var_os("KILN_EXEC_PROBE").is_none() {
        return;
    }
    let errno = |r: libc::c_long| {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    };
    // SAFETY: each syscall is called with harmless arguments; failures are the point.
    unsafe {
        let results = [
            (
                "keyctl",
                errno(libc::syscall(
                    libc::SYS_keyctl,
                    0, /* KEYCTL_GET_KEYRING_ID */
                    -3,
                    0,
                )),
            ),
            (
                "add_key",
                errno(libc::syscall(
                    libc::SYS_add_key,
                    c"user".as_ptr(),
                    c"k".as_ptr(),
                    c"v".as_ptr(),
                    1,
                    -3,
                )),
            ),
            (
                "unshare",
                errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)),
            ),
            (
                "ptrace",
                errno(libc::syscall(
                    libc::SYS_ptrace,
                    libc::PTRACE_TRACEME,
                    0,
                    0,
                    0,
                )),
            ),
            ("bpf", errno(libc::syscall(libc::SYS_bpf, 0, 0, 0))),
            ("clone3", errno(libc::syscall(libc::SYS_clone3, 0, 0))),
            (
                "mount",
                errno(libc::syscall(
                    libc::SYS_mount,
                    c"none".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    0,
                )),
            ),
            ("getpid", errno(libc::syscall(libc::SYS_getpid))),
        ];
        for (name, e) in results {
            println!("PROBE {name}={e}");
        }
    }
    // Threads still start: libc falls back from clone3 to clone.
    let t = std::thread::spawn(|| 7).join().unwrap();
    println!("PROBE thread={t}");
}

#[test]
fn root_seccomp_blocks_keyctl_ptrace_bpf_and_namespace_clones() {
    require_root("root_seccomp_blocks_keyctl_ptrace_bpf_and_namespace_clones");
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    busybox_rootfs(&lower);
    std::fs::create_dir_all(lower.join("usr/lib")).unwrap();
    std::fs::create_dir_all(lower.join("usr/lib64")).unwrap();
    std::os::unix::fs::symlink("usr/lib", lower.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", lower.join("lib64")).unwrap();
    let fs = OverlayRootfs::with_lower(dir, lower);
    let me = std::env::current_exe().unwrap();
    let mut spec = ExecSpec::new(
        &fs.merged,
        vec![
            "/probe".into(),
            "--exact".into(),
            "syscall_probe_inside_container".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ],
    );
    spec.env = vec![("KILN_EXEC_PROBE".into(), "1".into())];
    // The test binary and the host's libraries it links against, read-only.
    spec.mounts = vec![MountSpec {
        target: "/probe".into(),
        kind: MountKind::Bind {
            source: me,
            readwrite: false,
        },
    }];
    for lib in ["/usr/lib", "/usr/lib64"] {
        if std::path::Path::new(lib).is_dir() {
            spec.mounts.push(MountSpec {
                target: lib.into(),
                kind: MountKind::Bind {
                    source: lib.into(),
                    readwrite: false,
                },
            });
        }
    }
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    let probes: BTreeMap<String, String> = out
        .stdout
        .iter()
        .filter_map(|l| {
            std::str::from_utf8(l)
                .ok()?
                .split_once("PROBE ")
                .map(|(_, p)| p)
        })
        .filter_map(|l| {
            l.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let eperm = libc::EPERM.to_string();
    for name in ["keyctl", "add_key", "unshare", "ptrace", "bpf", "mount"] {
        assert_eq!(
            probes.get(name),
            Some(&eperm),
            "{name}: {probes:?}\n{}",
            out.stderr_text()
        );
    }
    assert_eq!(probes.get("clone3"), Some(&libc::ENOSYS.to_string()));
    assert_eq!(probes.get("getpid"), Some(&"0".to_string()));
    assert_eq!(probes.get("thread"), Some(&"7".to_string()));
    assert_eq!(fs.upper_tree(), BTreeMap::new());
}

#[test]
fn root_user_resolves_by_name_and_uid_gid_with_supplementary_groups() {
    require_root("root_user_resolves_by_name_and_uid_gid_with_supplementary_groups");
    let fs = OverlayRootfs::new();
    let cases = [
        (None, "uid=0(root) gid=0(root) groups=0(root)"),
        (
            Some("alice"),
            "uid=1000(alice) gid=1000(alice) groups=10(wheel),50(staff),1000(alice)",
        ),
        (
            Some("1000:50"),
            "uid=1000(alice) gid=50(staff) groups=50(staff)",
        ),
        (
            Some("alice:wheel"),
            "uid=1000(alice) gid=10(wheel) groups=10(wheel)",
        ),
        (Some("4321"), "uid=4321 gid=0(root) groups=0(root)"),
    ];
    for (user, want) in cases {
        let fs = OverlayRootfs::new();
        let mut spec = sh(&fs.merged, "id; echo $HOME");
        spec.user = user.map(str::to_string);
        let (st, out) = run(&exec(), &spec);
        expect_ok(st, &out);
        assert_eq!(
            out.stdout
                .first()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .as_deref(),
            Some(want),
            "USER {user:?}"
        );
    }
    let mut spec = sh(&fs.merged, "true");
    spec.user = Some("mallory".into());
    let err = exec()
        .run(&spec, &mut CollectedOutput::default(), &CancelToken::new())
        .unwrap_err();
    assert!(matches!(err, ExecError::User { .. }), "{err}");
}

#[test]
fn root_working_dir_is_created_and_owned_by_the_user() {
    require_root("root_working_dir_is_created_and_owned_by_the_user");
    let fs = OverlayRootfs::new();
    let mut spec = sh(&fs.merged, "pwd; stat -c '%u:%g' . ..; touch mine");
    spec.user = Some("alice".into());
    spec.cwd = "/home/alice/src".into();
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(out.stdout_text(), "/home/alice/src\n1000:1000\n1000:1000");
    assert_eq!(
        fs.upper_tree(),
        map(&[
            ("home", "dir 755 1000:1000"),
            ("home/alice", "dir 755 1000:1000"),
            ("home/alice/src", "dir 755 1000:1000"),
            ("home/alice/src/mine", "file 644 1000:1000 "),
        ])
    );
}

#[test]
fn root_exit_codes_signal_deaths_and_missing_commands_are_reported() {
    require_root("root_exit_codes_signal_deaths_and_missing_commands_are_reported");
    let step = |script: &str| run(&exec(), &sh(&OverlayRootfs::new().merged, script));
    assert_eq!(step("exit 42").0, ExitStatus::Code(42));
    assert_eq!(step("kill -SEGV $$").0, ExitStatus::Signal(libc::SIGSEGV));
    assert_eq!(step("kill -9 $$").0, ExitStatus::Signal(libc::SIGKILL));
    // SIGPIPE kills a writer whose reader is gone (Rust's ignored SIGPIPE is not inherited).
    let (st, out) = step("yes | head -n 2 > /dev/null; echo done");
    expect_ok(st, &out);
    let fs = OverlayRootfs::new();
    let spec = ExecSpec::new(&fs.merged, vec!["no-such-tool".into()]);
    let err = exec()
        .run(&spec, &mut CollectedOutput::default(), &CancelToken::new())
        .unwrap_err();
    assert!(matches!(err, ExecError::CommandNotFound { .. }), "{err}");
    let mut spec = ExecSpec::new(&fs.merged, vec!["true".into()]);
    spec.mounts = vec![MountSpec {
        target: "/root/.ssh/agent".into(),
        kind: MountKind::Ssh {
            socket: fs.merged.join("etc/passwd"),
            uid: 0,
            gid: 0,
            mode: 0o600,
        },
    }];
    let err = exec()
        .run(&spec, &mut CollectedOutput::default(), &CancelToken::new())
        .unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
}

#[test]
fn root_ssh_mount_is_a_forwarding_socket_with_its_owner_and_mode_and_leaves_no_mount_point() {
    require_root(
        "root_ssh_mount_is_a_forwarding_socket_with_its_owner_and_mode_and_leaves_no_mount_point",
    );
    let dir = tempfile::tempdir().unwrap();
    let agent_path = dir.path().join("agent.sock");
    let agent = std::os::unix::net::UnixListener::bind(&agent_path).unwrap();
    let fs = OverlayRootfs::new();
    let mut spec = sh(
        &fs.merged,
        "stat -c '%F %a %u:%g' /run/buildkit/ssh_agent.0 /home/app/agent",
    );
    spec.mounts = vec![
        MountSpec {
            target: "/run/buildkit/ssh_agent.0".into(),
            kind: MountKind::Ssh {
                socket: agent_path.clone(),
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
        },
        MountSpec {
            target: "/home/app/agent".into(),
            kind: MountKind::Ssh {
                socket: agent_path.clone(),
                uid: 33,
                gid: 33,
                mode: 0o660,
            },
        },
    ];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(
        out.stdout_text(),
        "socket 600 0:0\nsocket 660 33:33",
        "{}",
        out.stderr_text()
    );
    assert_eq!(
        fs.upper_tree(),
        BTreeMap::new(),
        "the ssh mount points (and /run/buildkit, /home/app) left the layer"
    );
    drop(agent);
}

/// Cancels its token when the step says it has started its tree.
struct CancelWhenStarted {
    token: CancelToken,
    lines: Vec<String>,
}

impl OutputSink for CancelWhenStarted {
    fn line(&mut self, line: OutputLine<'_>) {
        let text = String::from_utf8_lossy(line.bytes).into_owned();
        if text == "started" {
            self.token.cancel();
        }
        self.lines.push(text);
    }
}

fn processes_running(pattern: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(pattern) {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut zombies = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) {
            // pid (comm) state ppid ...
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if f.first() == Some(&"Z") && f.get(1) == Some(&me.as_str()) {
                    zombies.push(stat);
                }
            }
        }
    }
    zombies
}

#[test]
fn root_cancellation_kills_the_whole_process_tree_and_leaves_no_zombies() {
    require_root("root_cancellation_kills_the_whole_process_tree_and_leaves_no_zombies");
    let fs = OverlayRootfs::new();
    let token = CancelToken::new();
    let mut sink = CancelWhenStarted {
        token: token.clone(),
        lines: Vec::new(),
    };
    let spec = sh(&fs.merged, "sleep 4711 & sleep 4711 & (sleep 4711 & sleep 4711) & sh -c 'sleep 4711' & echo started; wait");
    let t0 = std::time::Instant::now();
    let err = exec().run(&spec, &mut sink, &token).unwrap_err();
    eprintln!("cancelled after {:?}", t0.elapsed());
    assert!(matches!(err, ExecError::Cancelled), "{err}");
    assert_eq!(sink.lines, vec!["started".to_string()]);
    assert_eq!(processes_running("sleep 4711"), Vec::<String>::new());
    assert_eq!(zombie_children(), Vec::<String>::new());
    assert_eq!(fs.upper_tree(), BTreeMap::new());
    // A token cancelled beforehand refuses to start.
    let err = exec()
        .run(
            &sh(&fs.merged, "true"),
            &mut CollectedOutput::default(),
            &token,
        )
        .unwrap_err();
    assert!(matches!(err, ExecError::Cancelled));
}

#[test]
fn root_runs_from_many_threads_at_once_keep_their_output_apart() {
    require_root("root_runs_from_many_threads_at_once_keep_their_output_apart");
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let results = results.clone();
            std::thread::spawn(move || {
                // One rootfs per run, as the solver prepares a snapshot per step.
                let fs = OverlayRootfs::new();
                let mut spec = sh(&fs.merged, "for n in 1 2 3; do echo $N-$n; done; exit $N");
                spec.env = vec![("N".into(), i.to_string())];
                let (st, out) = run(&NamespaceExecutor::new(), &spec);
                assert_eq!(fs.upper_tree(), BTreeMap::new());
                results.lock().unwrap().push((i, st, out.stdout_text()));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 8);
    for (i, st, out) in results.iter() {
        assert_eq!(*st, ExitStatus::Code(*i));
        assert_eq!(out, &format!("{i}-1\n{i}-2\n{i}-3"));
    }
    assert_eq!(zombie_children(), Vec::<String>::new());
}

#[test]
fn root_masked_and_read_only_paths_follow_docker() {
    require_root("root_masked_and_read_only_paths_follow_docker");
    let fs = OverlayRootfs::new();
    let script =
        "for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats; do
                    [ -e $p ] && echo \"$p $(cat $p 2>/dev/null | wc -c)\"
                  done
                  echo firmware $(ls -A /sys/firmware | wc -l)
                  echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo WROTE-PROC-SYS
                  echo 1 > /proc/sysrq-trigger 2>/dev/null && echo WROTE-SYSRQ
                  touch /sys/kernel/x 2>/dev/null && echo WROTE-SYS
                  grep -E ' /(sys|proc/sys) ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1";
    let (st, out) = run(&exec(), &sh(&fs.merged, script));
    expect_ok(st, &out);
    let text = out.stdout_text();
    assert!(!text.contains("WROTE"), "{text}");
    let masked: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("/proc/") && !l.ends_with(" ro"))
        .collect();
    let timer_list_on_host = std::fs::read("/proc/timer_list")
        .map(|b| b.len())
        .unwrap_or(0);
    assert!(
        timer_list_on_host == 0 || masked.contains(&"/proc/timer_list 0"),
        "{text}"
    );
    assert!(masked.iter().all(|l| l.ends_with(" 0")), "{text}");
    assert!(text.contains("firmware 0"), "{text}");
    assert!(
        text.lines().any(|l| l == "/sys ro") && text.lines().any(|l| l == "/proc/sys ro"),
        "{text}"
    );
}

#[test]
fn root_bind_mounts_are_read_only_or_copy_on_write_never_writing_through() {
    require_root("root_bind_mounts_are_read_only_or_copy_on_write_never_writing_through");
    let fs = OverlayRootfs::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a.txt"), "original\n").unwrap();
    let mut spec = sh(
        &fs.merged,
        "echo changed > /ro/a.txt 2>/dev/null && echo RO-WRITABLE
         echo changed > /rw/a.txt && echo new > /rw/b.txt && cat /rw/a.txt /rw/b.txt
         echo changed > /file.txt && cat /file.txt
         grep ' /tmpfs ' /proc/mounts | grep -o 'size=[0-9a-z]*'",
    );
    spec.mounts = vec![
        MountSpec {
            target: "/ro".into(),
            kind: MountKind::Bind {
                source: src.path().to_path_buf(),
                readwrite: false,
            },
        },
        MountSpec {
            target: "/rw".into(),
            kind: MountKind::Bind {
                source: src.path().to_path_buf(),
                readwrite: true,
            },
        },
        MountSpec {
            target: "/file.txt".into(),
            kind: MountKind::Bind {
                source: src.path().join("a.txt"),
                readwrite: true,
            },
        },
        MountSpec {
            target: "/tmpfs".into(),
            kind: MountKind::Tmpfs {
                size: Some(2 << 20),
            },
        },
    ];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    assert_eq!(out.stdout_text(), "changed\nnew\nchanged\nsize=2048k");
    assert_eq!(
        std::fs::read_to_string(src.path().join("a.txt")).unwrap(),
        "original\n"
    );
    assert!(!src.path().join("b.txt").exists());
    assert_eq!(fs.upper_tree(), BTreeMap::new());
}

#[test]
fn root_rlimits_are_clamped_to_the_hard_limit_never_raised() {
    require_root("root_rlimits_are_clamped_to_the_hard_limit_never_raised");
    let fs = OverlayRootfs::new();
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    let mut spec = sh(&fs.merged, "ulimit -n; ulimit -Hn");
    spec.rlimits = vec![kiln_exec::Rlimit {
        resource: kiln_exec::RlimitResource::Nofile,
        soft: 1 << 30,
        hard: 1 << 30,
    }];
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    let max = if hard.rlim_max == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        hard.rlim_max.to_string()
    };
    assert_eq!(out.stdout_text(), format!("{max}\n{max}"));
}

#[test]
fn root_large_output_streams_in_order_with_long_lines_split() {
    require_root("root_large_output_streams_in_order_with_long_lines_split");
    let fs = OverlayRootfs::new();
    let (st, out) = run(
        &exec(),
        &sh(
            &fs.merged,
            "seq 1 20000; head -c 200000 /dev/zero | tr '\\0' x; echo; printf tail",
        ),
    );
    expect_ok(st, &out);
    assert_eq!(out.stdout.len(), 20000 + 4 + 1);
    assert_eq!(out.stdout[19999], b"20000");
    assert_eq!(out.stdout[20000].len(), 65536);
    assert_eq!(out.stdout.last().unwrap(), b"tail");
    let _ = std::io::stdout().flush();
    let _ = Path::new("/");
}

#[test]
fn root_a_linux32_step_sees_the_32_bit_machine_name() {
    require_root("root_a_linux32_step_sees_the_32_bit_machine_name");
    let Some(machine) = linux32_machine() else {
        return;
    };
    // A fresh overlay per run: a run's rootfs is committed after it, never run again.
    let uname = |fs: &OverlayRootfs| {
        let mut spec = sh(&fs.merged, "uname -m; sh -c 'uname -m'");
        spec.network = Network::None;
        spec
    };
    let fs = OverlayRootfs::new();
    let (st, out) = run(&exec(), &uname(&fs));
    expect_ok(st, &out);
    assert_eq!(
        out.stdout_text(),
        format!("{0}\n{0}", std::env::consts::ARCH)
    );
    let fs = OverlayRootfs::new();
    let mut spec = uname(&fs);
    spec.personality = kiln_exec::Personality::Linux32;
    let (st, out) = run(&exec(), &spec);
    expect_ok(st, &out);
    // Inherited by the step's children too.
    assert_eq!(out.stdout_text(), format!("{machine}\n{machine}"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn root_a_real_i386_binary_runs_under_the_default_seccomp_profile() {
    require_root("root_a_real_i386_binary_runs_under_the_default_seccomp_profile");
    // 32-bit-only calls on the way: mmap2, fstat64/stat64, _llseek, getuid32, fcntl64.
    let script = "uname -m; ls -l / >/dev/null && echo ls-ok; cat /etc/motd; \
                  id -u; dd if=/etc/motd bs=1 skip=1 count=2 2>/dev/null; echo; \
                  unshare -U true 2>&1; echo unshare-rc=$?";
    let run32 = |privileged: bool| {
        let fs = i386_busybox_overlay();
        let mut spec = sh(&fs.merged, script);
        spec.network = Network::None;
        spec.personality = kiln_exec::Personality::Linux32;
        spec.privileged = privileged;
        run(&exec(), &spec)
    };
    let (st, out) = run32(false);
    expect_ok(st, &out);
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..5], ["i686", "ls-ok", "hello", "0", "el"], "{text}");
    // A call the profile leaves out is refused for the 32-bit ABI too: a user namespace
    // needs no capability, so only the filter stops it.
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("unshare-rc=1"), "{text}");
    let (st, out) = run32(true);
    expect_ok(st, &out);
    assert!(
        out.stdout_text().contains("unshare-rc=0"),
        "without the filter the call works: {}",
        out.stdout_text()
    );
}
