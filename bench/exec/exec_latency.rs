//! Container start-to-exit latency for `true`, 50 runs per backend, on a busybox overlay
//! rootfs. Run as root: `cargo bench -p kiln-exec --bench exec_latency`.
//! Each run gets a fresh overlay (mounted outside the timed region), as a build step does.

#[path = "../../crates/kiln-exec/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{busybox_rootfs, OverlayRootfs};
use kiln_exec::{
    CancelToken, CollectedOutput, ExecSpec, Executor, NamespaceExecutor, RuncExecutor,
};

const RUNS: usize = 50;

fn lower_like_an_image(dir: &std::path::Path) {
    busybox_rootfs(dir);
    // Images normally ship these mount points, so no placeholder is needed.
    for d in ["proc", "dev", "sys"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("etc/hosts"), "").unwrap();
    std::fs::write(dir.join("etc/resolv.conf"), "").unwrap();
}

fn measure(name: &str, exec: &dyn Executor, image_like: bool) {
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 3 {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        if image_like {
            lower_like_an_image(&lower);
        } else {
            busybox_rootfs(&lower);
        }
        let fs = OverlayRootfs::with_lower(dir, lower);
        let spec = ExecSpec::new(&fs.merged, vec!["true".into()]);
        let t0 = Instant::now();
        let st = exec
            .run(&spec, &mut CollectedOutput::default(), &CancelToken::new())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dt = t0.elapsed();
        assert!(st.success(), "{name}: {st}");
        if i >= 3 {
            times.push(dt); // the first 3 warm caches
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(times[RUNS / 2]);
    let p90 = ms(times[RUNS * 9 / 10]);
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / RUNS as f64;
    println!(
        "{name:<44} runs={RUNS} median={median:.1} ms p90={p90:.1} ms mean={mean:.1} ms min={:.1} ms max={:.1} ms",
        ms(times[0]),
        ms(times[RUNS - 1])
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("exec_latency needs root (namespaces, mounts); skipped");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    measure(
        "namespace (image with mount points)",
        &NamespaceExecutor::new(),
        true,
    );
    measure(
        "namespace (bare busybox, placeholders)",
        &NamespaceExecutor::new(),
        false,
    );
    measure(
        "runc (image with mount points)",
        &RuncExecutor::default(),
        true,
    );
    measure(
        "runc (bare busybox, placeholders)",
        &RuncExecutor::default(),
        false,
    );
}
