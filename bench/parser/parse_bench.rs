//! Parser throughput: parses (and lowers to typed instructions) a generated 10,000-line
//! Dockerfile many times and prints the median.
//!
//! Run: `cargo run --release -p kiln-dockerfile --example parse_bench`

use std::time::{Duration, Instant};

use kiln_dockerfile::instructions::lower_all;
use kiln_dockerfile::parse;

/// A realistic mix: stages, RUN with mounts and continuations, heredocs, COPY, ENV, ARG, LABEL.
fn generate(lines: usize) -> String {
    let mut s = String::from("# syntax=docker/dockerfile:1\nARG BASE=alpine:3.20\n");
    let mut stage = 0;
    while s.lines().count() < lines {
        s.push_str(&format!(
            "\n# stage {stage}\nFROM ${{BASE}} AS stage{stage}\n"
        ));
        s.push_str(
            "WORKDIR /app\nENV PATH=/usr/local/bin:$PATH LANG=C.UTF-8\nARG VERSION=1.0 FLAVOR\n",
        );
        s.push_str("RUN --mount=type=cache,target=/var/cache/apk,sharing=locked \\\n    apk add --no-cache curl git \\\n    && rm -rf /tmp/*\n");
        s.push_str(&format!(
            "COPY --from=stage{} --chown=1000:1000 /app/out /app/in\n",
            stage.max(1) - 1
        ));
        s.push_str("RUN <<EOF\nset -e\necho building $VERSION\nmake -j2\nEOF\n");
        s.push_str("LABEL org.opencontainers.image.title=\"app\" version=\"${VERSION}\"\n");
        s.push_str("CMD [\"/app/server\", \"--port\", \"8080\"]\n");
        stage += 1;
    }
    s
}

fn main() {
    let src = generate(10_000);
    let lines = src.lines().count();
    let mut parse_times = Vec::new();
    let mut total_times = Vec::new();
    let mut instructions = 0;
    for _ in 0..31 {
        let t = Instant::now();
        let df = parse(&src).expect("generated Dockerfile parses");
        let parsed = t.elapsed();
        let typed = lower_all(&df).expect("generated Dockerfile lowers");
        let total = t.elapsed();
        instructions = typed.len();
        parse_times.push(parsed);
        total_times.push(total);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "{lines} lines, {instructions} instructions, {} bytes: parse median {:.2?}, parse+typed median {:.2?} (31 runs)",
        src.len(),
        median(&mut parse_times),
        median(&mut total_times)
    );
}
