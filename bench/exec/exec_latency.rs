//! Container start-to-exit latency for `true`, 50 runs per backend, on a busybox overlay
//! rootfs. Run as root: `cargo bench -p kiln-exec --bench exec_latency`.
//! Each run gets a fresh overlay (mounted outside the timed region), as a build step does.
//! The network rows run two setups alternately, so both see the same machine load, and report
//! the median of the per-pair differences: the cost of the isolated default over the host's
//! network.

#[path = "../../crates/kiln-exec/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{busybox_rootfs, OverlayRootfs};
use kiln_exec::{
    CancelToken, CollectedOutput, ExecSpec, Executor, NamespaceExecutor, Network, RuncExecutor,
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

/// One timed run of `true` on a fresh overlay.
fn time_run(name: &str, exec: &dyn Executor, image_like: bool, network: Network) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    if image_like {
        lower_like_an_image(&lower);
    } else {
        busybox_rootfs(&lower);
    }
    let fs = OverlayRootfs::with_lower(dir, lower);
    let mut spec = ExecSpec::new(&fs.merged, vec!["true".into()]);
    spec.network = network;
    let t0 = Instant::now();
    let st = exec
        .run(&spec, &mut CollectedOutput::default(), &CancelToken::new())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let dt = t0.elapsed();
    assert!(st.success(), "{name}: {st}");
    dt
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let n = times.len();
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / n as f64;
    format!(
        "median={:.1} ms p90={:.1} ms mean={mean:.1} ms min={:.1} ms max={:.1} ms",
        ms(times[n / 2]),
        ms(times[n * 9 / 10]),
        ms(times[0]),
        ms(times[n - 1])
    )
}

fn measure(name: &str, exec: &dyn Executor, image_like: bool, network: Network) {
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 3 {
        let dt = time_run(name, exec, image_like, network);
        if i >= 3 {
            times.push(dt); // the first 3 warm caches
        }
    }
    println!("{name:<52} runs={RUNS} {}", summary(&mut times));
}

/// A setup to compare: its name and how each run gets its executor.
struct Setup<'a> {
    name: &'a str,
    network: Network,
    /// A new executor per run (nothing pooled), or one shared by all runs.
    fresh_executor: bool,
}

/// Runs `base` and `other` alternately and prints both and the median per-pair difference.
fn compare(backend: &str, make: &dyn Fn() -> Box<dyn Executor>, base: Setup, other: Setup) {
    let shared = make();
    let mut a = Vec::with_capacity(RUNS);
    let mut b = Vec::with_capacity(RUNS);
    let mut diff = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 3 {
        let one = |s: &Setup| {
            if s.fresh_executor {
                let e = make();
                time_run(s.name, e.as_ref(), true, s.network)
            } else {
                time_run(s.name, shared.as_ref(), true, s.network)
            }
        };
        // Alternate the order so neither setup always runs right after the other.
        let (ta, tb) = if i % 2 == 0 {
            let ta = one(&base);
            (ta, one(&other))
        } else {
            let tb = one(&other);
            (one(&base), tb)
        };
        if i >= 3 {
            a.push(ta);
            b.push(tb);
            diff.push(ms(tb) - ms(ta));
        }
    }
    diff.sort_by(|x, y| x.total_cmp(y));
    println!(
        "{backend} {:<40} runs={RUNS} {}",
        base.name,
        summary(&mut a)
    );
    println!(
        "{backend} {:<40} runs={RUNS} {}",
        other.name,
        summary(&mut b)
    );
    println!(
        "{backend} {:<40} median per-pair difference {:+.2} ms (p10 {:+.2}, p90 {:+.2})",
        format!("{} - {}", other.name, base.name),
        diff[RUNS / 2],
        diff[RUNS / 10],
        diff[RUNS * 9 / 10]
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
    let host = || Setup {
        name: "host network",
        network: Network::Host,
        fresh_executor: false,
    };
    let kiln = || Box::new(NamespaceExecutor::new()) as Box<dyn Executor>;
    let runc = || Box::new(RuncExecutor::default()) as Box<dyn Executor>;
    compare(
        "namespace",
        &kiln,
        host(),
        Setup {
            name: "isolated (pooled netns, the default)",
            network: Network::Isolated,
            fresh_executor: false,
        },
    );
    compare(
        "namespace",
        &kiln,
        host(),
        Setup {
            name: "isolated, cold (new netns + slirp4netns)",
            network: Network::Isolated,
            fresh_executor: true,
        },
    );
    compare(
        "namespace",
        &kiln,
        host(),
        Setup {
            name: "none (new empty netns)",
            network: Network::None,
            fresh_executor: false,
        },
    );
    compare(
        "runc",
        &runc,
        host(),
        Setup {
            name: "isolated (pooled netns, the default)",
            network: Network::Isolated,
            fresh_executor: false,
        },
    );
    measure(
        "namespace (bare busybox, placeholders, isolated)",
        &NamespaceExecutor::new(),
        false,
        Network::Isolated,
    );
    measure(
        "runc (bare busybox, placeholders, isolated)",
        &RuncExecutor::default(),
        false,
        Network::Isolated,
    );
}
