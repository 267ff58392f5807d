//! The chroot executor on a plain directory tree (what the copying snapshotter prepares where
//! no mount is possible): the step runs in the tree with the mount contents put in, and the
//! tree afterwards holds only the step's own changes. Needs root (chroot, chown, mknod).

mod common;

use std::fs;

use common::*;
use kiln_exec::{
    CancelToken, ChrootExecutor, CollectedOutput, ExecError, ExecSpec, Executor, ExitStatus,
    MountKind, MountSpec, Network, Secret,
};

fn host_net(mut spec: ExecSpec) -> ExecSpec {
    spec.network = Network::Host;
    spec
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

#[test]
fn a_step_that_changes_nothing_leaves_the_tree_exactly_as_it_was() {
    require_root("chroot");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    fs::write(root.join("etc/hosts"), "the image's own hosts\n").unwrap();
    let before = tree(&root);
    let mut spec = host_net(sh(
        &root,
        "cat /etc/hosts; test -d /proc && test -d /sys && test -d /dev/shm; ls /run/secrets",
    ));
    spec.mounts.push(MountSpec::secret(
        "token",
        None,
        Secret::new("s3cr3t-value"),
    ));
    spec.mounts.push(MountSpec {
        target: "/var/cache/x".into(),
        kind: MountKind::Tmpfs { size: None },
    });
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert!(
        out.stdout_text()
            .contains(hosts.lines().next().unwrap_or("")),
        "the step sees the host's /etc/hosts: {}",
        out.stdout_text()
    );
    assert!(!out.stdout_text().contains("the image's own"));
    assert!(out.stdout_text().contains("token"));
    assert_eq!(tree(&root), before);
    let siblings: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(siblings.len(), 1, "nothing left beside the tree");
}

#[test]
fn the_steps_changes_stay_and_what_mounts_put_in_goes() {
    require_root("chroot");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    let cache = d.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    fs::write(cache.join("from-before"), "1").unwrap();
    let mut spec = host_net(sh(
        &root,
        "set -e; echo made > /data/new.txt; rm /data/remove.txt; \
         cat /run/secrets/token; echo; \
         cat /root/.cache/from-before; echo 2 > /root/.cache/from-step;",
    ));
    spec.mounts.push(MountSpec::secret(
        "token",
        None,
        Secret::new("s3cr3t-value"),
    ));
    spec.mounts.push(MountSpec {
        target: "/root/.cache".into(),
        kind: MountKind::Cache {
            source: cache.clone(),
        },
    });
    let before = tree(&root);
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    assert!(out.secret_redacted && !out.stdout_text().contains("s3cr3t"));
    let after = tree(&root);
    assert_eq!(
        after.get("data/new.txt").map(String::as_str),
        Some("file 644 0:0 made")
    );
    assert!(!after.contains_key("data/remove.txt"));
    assert!(!after.contains_key("run"), "no secret dir left: {after:?}");
    assert!(
        !after.keys().any(|k| k.starts_with("root/.cache/")),
        "{after:?}"
    );
    let mut want = before.clone();
    want.remove("data/remove.txt");
    want.insert("data/new.txt".into(), "file 644 0:0 made".into());
    assert_eq!(after, want);
    assert_eq!(fs::read_to_string(cache.join("from-step")).unwrap(), "2\n");
    assert!(cache.join("from-before").is_file());
}

#[test]
fn the_step_runs_as_user_without_chroot_and_its_leftovers_are_killed() {
    require_root("chroot");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    // CAP_SYS_CHROOT is dropped: a step cannot chroot again to walk out of its tree.
    let (status, out) = run(
        &ChrootExecutor::new(),
        &host_net(sh(
            &root,
            "mkdir -p /x; chroot /x /bin/true && echo escaped || echo refused",
        )),
    );
    expect_ok(status, &out);
    assert_eq!(out.stdout_text().trim(), "refused");

    let mut spec = host_net(sh(&root, "id -u; id -g; touch /tmp/mine; ls -ln /tmp/mine"));
    spec.user = Some("alice".into());
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    let text = out.stdout_text();
    assert!(text.starts_with("1000\n1000\n"), "{text}");
    assert!(text.contains(" 1000 "), "{text}");

    // A background process the step leaves behind does not outlive it.
    let marker = format!("{}", 424_242 + std::process::id() % 1000);
    let (status, out) = run(
        &ChrootExecutor::new(),
        &host_net(sh(&root, &format!("sleep {marker} & echo started"))),
    );
    expect_ok(status, &out);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let alive = fs::read_dir("/proc").unwrap().flatten().any(|e| {
        fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&marker))
            .unwrap_or(false)
    });
    assert!(!alive, "sleep {marker} survived its step");
}

#[test]
fn chroot_refuses_the_isolated_network_and_ssh_with_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    let mut out = CollectedOutput::default();
    let err = ChrootExecutor::new()
        .run(&sh(&root, "true"), &mut out, &CancelToken::new())
        .unwrap_err();
    assert!(
        matches!(&err, ExecError::Network(m) if m.contains("--network host --allow network.host")),
        "{err}"
    );
    let mut spec = sh(&root, "true");
    spec.network = Network::None;
    let err = ChrootExecutor::new()
        .run(&spec, &mut out, &CancelToken::new())
        .unwrap_err();
    assert!(err.to_string().contains("--network=none"), "{err}");
    let mut spec = host_net(sh(&root, "true"));
    spec.mounts.push(MountSpec {
        target: "/run/ssh".into(),
        kind: MountKind::Ssh {
            socket: "/nonexistent".into(),
            uid: 0,
            gid: 0,
            mode: 0o600,
        },
    });
    let err = ChrootExecutor::new()
        .run(&spec, &mut out, &CancelToken::new())
        .unwrap_err();
    assert!(err.to_string().contains("type=ssh"), "{err}");
}

#[test]
fn a_linux32_step_sees_the_32_bit_machine_name() {
    require_root("chroot");
    let Some(machine) = linux32_machine() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    let mut spec = host_net(sh(&root, "uname -m"));
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    assert_eq!(out.stdout_text(), std::env::consts::ARCH);
    spec.personality = kiln_exec::Personality::Linux32;
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    assert_eq!(out.stdout_text(), machine);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_real_i386_binary_runs_under_the_default_seccomp_profile() {
    require_root("chroot");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("fs");
    busybox_rootfs(&root);
    let i386 = kiln_test_env::multiarch::busybox_rootfs("386").join("bin/busybox");
    std::fs::copy(&i386, root.join("bin/busybox")).unwrap();
    let mut spec = host_net(sh(
        &root,
        "uname -m; ls -l /bin/busybox | wc -l; cat /etc/motd",
    ));
    spec.personality = kiln_exec::Personality::Linux32;
    let (status, out) = run(&ChrootExecutor::new(), &spec);
    expect_ok(status, &out);
    assert_eq!(out.stdout_text(), "i686\n1\nhello");
}
