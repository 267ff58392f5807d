//! kiln's own executor on a real busybox overlay rootfs (root only).

mod common;

use common::*;
use kiln_exec::{ExitStatus, NamespaceExecutor};

#[test]
fn root_smoke_echo_runs_in_container() {
    if !is_root("root_smoke_echo_runs_in_container") {
        return;
    }
    let fs = OverlayRootfs::new();
    let (st, out) = run(&NamespaceExecutor::new(), &sh(&fs.merged, "echo hello; echo err >&2; cat /etc/hosts | head -1; ls /dev; id; hostname; exit 3"));
    eprintln!("stdout:\n{}\nstderr:\n{}", out.stdout_text(), out.stderr_text());
    assert_eq!(st, ExitStatus::Code(3));
    eprintln!("{:#?}", fs.upper_tree());
}
