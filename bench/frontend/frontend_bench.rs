//! Frontend throughput: parses and lowers a generated 10,000-line multi-stage Dockerfile
//! (ARG/ENV expansion, RUN mounts, COPY --from between stages, heredocs) 31 times and prints
//! the medians of wall time and of thread CPU time.
//!
//! Run: `cargo run --release -p kiln-graph --example frontend_bench`

use std::time::{Duration, Instant};

use kiln_graph::{lower, BuildOptions, OfflineResolver, Platform};

/// Stages that each build on an earlier one and copy from two others, like a large monorepo.
fn generate(lines: usize) -> String {
    let mut s =
        String::from("# syntax=docker/dockerfile:1\nARG BASE=busybox:1.36\nARG VERSION=1.0\n");
    let mut stage = 0usize;
    while s.lines().count() < lines {
        let from = if stage == 0 {
            "${BASE}".to_string()
        } else {
            format!("s{}", stage / 2)
        };
        s.push_str(&format!(
            "\n# s{stage} builds component {stage}.\nFROM {from} AS s{stage}\n"
        ));
        s.push_str("ARG VERSION\nARG TARGETARCH\nWORKDIR /src/app\n");
        s.push_str(&format!(
            "ENV COMPONENT=c{stage} PATH=/opt/bin:$PATH OUT=/out/${{VERSION}}\n"
        ));
        s.push_str("COPY go.mod go.sum ./\n");
        s.push_str(
            "RUN --mount=type=cache,target=/root/.cache,id=build-${TARGETARCH} \\\n    --mount=type=secret,id=token \\\n    make deps \\\n    && make build OUT=$OUT\n",
        );
        if stage > 0 {
            s.push_str(&format!(
                "COPY --from=s{} --chown=1000:1000 /out /deps/a\n",
                stage - 1
            ));
        }
        s.push_str("COPY <<EOF /etc/app.conf\ncomponent=$COMPONENT\nversion=$VERSION\nEOF\n");
        s.push_str(
            "LABEL org.opencontainers.image.version=\"${VERSION}\" component=\"$COMPONENT\"\n",
        );
        s.push_str("EXPOSE 8080\nUSER 1000:1000\nCMD [\"/out/server\"]\n");
        stage += 1;
    }
    s
}

/// CPU time of this thread: unlike wall time it does not grow when other processes load the
/// (2-core, shared) machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let src = generate(10_000);
    let mut opts = BuildOptions::for_context(".");
    opts.platforms = vec![Platform::parse("linux/amd64").expect("valid platform")];
    let (mut parse_t, mut lower_t, mut total_t) = (Vec::new(), Vec::new(), Vec::new());
    let (mut parse_cpu, mut lower_cpu, mut total_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut vertices = 0;
    let mut stages = 0;
    for _ in 0..31 {
        let (t0, c0) = (Instant::now(), thread_cpu());
        let df = kiln_dockerfile::parse(&src).expect("generated Dockerfile parses");
        let (t1, c1) = (Instant::now(), thread_cpu());
        let g = lower(&df, &opts, &[], &OfflineResolver).expect("generated Dockerfile lowers");
        let (t2, c2) = (Instant::now(), thread_cpu());
        parse_cpu.push(c1 - c0);
        lower_cpu.push(c2 - c1);
        total_cpu.push(c2 - c0);
        vertices = g.vertices.len();
        stages = g.stages.len();
        parse_t.push(t1 - t0);
        lower_t.push(t2 - t1);
        total_t.push(t2 - t0);
    }
    println!(
        "{} lines, {} bytes, {stages} stages needed, {vertices} vertices: parse median {:.2?}, lower median {:.2?}, parse+lower median {:.2?} (31 runs)",
        src.lines().count(),
        src.len(),
        median(&mut parse_t),
        median(&mut lower_t),
        median(&mut total_t)
    );
    println!(
        "thread CPU time: parse median {:.2?}, lower median {:.2?}, parse+lower median {:.2?}",
        median(&mut parse_cpu),
        median(&mut lower_cpu),
        median(&mut total_cpu)
    );
}
