//! The pool of isolated networks and the process-count limit. One test in its own binary, so
//! the counts of this process's slirp4netns children and pids cgroups are not disturbed by
//! other tests running at the same time. Needs root and slirp4netns (.ci/install).

mod common;

use common::*;
use kiln_exec::{CollectedOutput, Executor, ExitStatus, NamespaceExecutor, Network, RuncExecutor};

fn expect_ok(status: ExitStatus, out: &CollectedOutput) {
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout_text(),
        out.stderr_text()
    );
}

fn netns_of(exec: &dyn Executor, privileged: bool) -> String {
    let fs = OverlayRootfs::new();
    let mut spec = sh(&fs.merged, "readlink /proc/self/ns/net");
    spec.privileged = privileged;
    let (st, out) = run(exec, &spec);
    expect_ok(st, &out);
    out.stdout_text()
}

fn slirp_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if head.ends_with("(slirp4netns") && ppid == Some(me.as_str()) {
            found.push(e.file_name().to_string_lossy().parse().unwrap());
        }
    }
    found
}

#[test]
fn root_networks_are_pooled_and_released_and_the_pids_limit_contains_forks() {
    if !is_root("root_networks_are_pooled_and_released_and_the_pids_limit_contains_forks") {
        panic!("needs root");
    }
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let exec = NamespaceExecutor::new();
    let first = netns_of(&exec, false);
    let second = netns_of(&exec, false);
    assert_eq!(first, second, "the second step reuses the pooled namespace");
    assert_ne!(first, host_ns.to_string_lossy(), "not the host's namespace");
    assert_eq!(slirp_children().len(), 1, "one pooled slirp4netns");
    // An insecure step could have reconfigured its namespace: it is not handed on.
    let insecure = netns_of(&exec, true);
    assert_eq!(insecure, first, "taken from the pool");
    assert_eq!(slirp_children().len(), 0, "closed after the insecure step");
    // (Namespace inode numbers are reused, so a fresh one may show the same number.)
    let children_before = slirp_children();
    netns_of(&exec, false);
    assert_eq!(children_before, Vec::<u32>::new());
    assert_eq!(slirp_children().len(), 1, "a fresh namespace, pooled again");
    drop(exec);
    assert_eq!(
        slirp_children(),
        Vec::<u32>::new(),
        "stopped with the executor"
    );

    // Starting 40 background processes: allowed without a limit, refused past 16.
    let script = "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo all-started";
    let fs = OverlayRootfs::new();
    let mut spec = sh(&fs.merged, script);
    spec.network = Network::None;
    let (st, out) = run(&NamespaceExecutor::new(), &spec);
    expect_ok(st, &out);
    assert_eq!(out.stdout_text(), "all-started");
    for (name, exec) in [
        (
            "kiln",
            Box::new(NamespaceExecutor::new().with_pids_limit(Some(16)).unwrap())
                as Box<dyn Executor>,
        ),
        (
            "runc",
            Box::new(RuncExecutor::default().with_pids_limit(Some(16))),
        ),
    ] {
        let fs = OverlayRootfs::new();
        let mut spec = sh(&fs.merged, script);
        spec.network = Network::None;
        let (st, out) = run(exec.as_ref(), &spec);
        assert_ne!(st, ExitStatus::Code(0), "{name}: {}", out.stdout_text());
        assert_eq!(out.stdout_text(), "", "{name}");
        assert!(
            out.stderr_text().contains("can't fork"),
            "{name}: {}",
            out.stderr_text()
        );
    }
    // kiln's per-run cgroups are gone after the runs.
    let mine = format!("{}-", std::process::id());
    let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/pids/kiln")
        .or_else(|_| std::fs::read_dir("/sys/fs/cgroup/kiln"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&mine))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
