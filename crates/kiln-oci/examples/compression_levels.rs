//! Bytes and CPU time of kiln's layer compression at several levels, against one flate2
//! level-6 gzip stream (Go's default level, which BuildKit uses) of the same tar.
//!
//! `cargo run --release -p kiln-oci --example compression_levels -- TAR CONFIG...` where a
//! CONFIG is `gzip:LEVEL:THREADS[:CHUNK_KIB]` or `zstd:LEVEL`. CPU time is the process's
//! user + system time (all threads), so the numbers hold on a loaded machine; wall time is
//! printed beside it but depends on the load. Results are in `docs/compression.md`.

use std::io::{Read, Write};
use std::time::Instant;

use kiln_oci::compression::{CompressOptions, Compression, Compressor};

fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn parse_config(s: &str) -> Result<(Compression, u32, usize, usize), String> {
    let p: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?}: expected gzip:LEVEL:THREADS[:CHUNK_KIB] or zstd:LEVEL");
    let c: Compression = p[0].parse().map_err(|_| bad())?;
    let level = p.get(1).ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let threads = match p.get(2) {
        Some(t) => t.parse().map_err(|_| bad())?,
        None => 1,
    };
    let chunk = match p.get(3) {
        Some(t) => t.parse::<usize>().map_err(|_| bad())? << 10,
        None => CompressOptions::default().chunk_size,
    };
    Ok((c, level, threads, chunk))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (tar, configs) = args
        .split_first()
        .ok_or("usage: compression_levels TAR gzip:LEVEL:THREADS[:CHUNK_KIB]|zstd:LEVEL ...")?;
    let mut data = Vec::new();
    std::fs::File::open(tar)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| format!("{tar}: {e}"))?;

    let (c0, t0) = (cpu_seconds(), Instant::now());
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(&data).map_err(|e| e.to_string())?;
    let reference = enc.finish().map_err(|e| e.to_string())?.len();
    println!(
        "input {:.1} MB; one level-6 gzip stream: {:.2} MB, CPU {:.2} s, wall {:.2} s",
        data.len() as f64 / 1e6,
        reference as f64 / 1e6,
        cpu_seconds() - c0,
        t0.elapsed().as_secs_f64()
    );
    println!("| config | MB | vs level-6 stream | CPU s | wall s | input MB per CPU s |");
    println!("|---|---|---|---|---|---|");
    for name in configs {
        let (c, level, threads, chunk_size) = parse_config(name)?;
        let opts = CompressOptions {
            gzip_level: level,
            zstd_level: level as i32,
            threads,
            chunk_size,
        };
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let mut w = Compressor::new(Vec::new(), c, &opts).map_err(|e| e.to_string())?;
        for part in data.chunks(1 << 16) {
            w.write_all(part).map_err(|e| e.to_string())?;
        }
        let out = w.finish().map_err(|e| e.to_string())?;
        let (cpu, wall) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
        println!(
            "| {name} | {:.2} | {:.3} | {:.2} | {:.2} | {:.0} |",
            out.len() as f64 / 1e6,
            out.len() as f64 / reference as f64,
            cpu,
            wall,
            data.len() as f64 / 1e6 / cpu
        );
    }
    Ok(())
}
