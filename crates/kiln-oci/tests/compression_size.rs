//! kiln's default layer compression against the size BuildKit's default makes.
//!
//! BuildKit gzips layers with Go's default level (6). The reference here is one flate2
//! level-6 gzip stream of the same tar; kiln's default compressor (several members, cut at
//! chunk boundaries, compressed on worker threads) must not be larger. Inputs are real trees
//! of the machine the test runs on, tarred by GNU tar: Python sources (many small text
//! files, the shape of a node_modules tree), ELF binaries and Debian's docs.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_oci::compression::{decompressing_reader, CompressOptions, Compression, Compressor};

/// At most this many bytes of each tree's tar: enough for several gzip members.
const SAMPLE_BYTES: u64 = 24 << 20;

/// The first `SAMPLE_BYTES` of `tar -c --sort=name` of `dir`.
fn tar_sample(dir: &str) -> Vec<u8> {
    let mut child = Command::new("tar")
        .args(["-c", "--sort=name", "--numeric-owner", "-C", dir, "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("GNU tar runs");
    let mut data = Vec::new();
    child
        .stdout
        .take()
        .expect("tar's stdout")
        .take(SAMPLE_BYTES)
        .read_to_end(&mut data)
        .expect("reading tar's output");
    // Stopping early closes the pipe under tar; its exit status says nothing here.
    let _ = child.kill();
    let _ = child.wait();
    data
}

fn reference_gzip_level6(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn kiln_gzip(data: &[u8], threads: usize) -> Vec<u8> {
    let opts = CompressOptions {
        threads,
        ..CompressOptions::default()
    };
    let mut w = Compressor::new(Vec::new(), Compression::Gzip, &opts).unwrap();
    for part in data.chunks(1 << 16) {
        w.write_all(part).unwrap();
    }
    w.finish().unwrap()
}

fn gunzip(blob: &[u8]) -> Vec<u8> {
    let (kind, mut r) = decompressing_reader(std::io::BufReader::new(blob)).unwrap();
    assert_eq!(kind, Compression::Gzip);
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn default_gzip_is_no_larger_than_go_default_level_on_real_trees() {
    let mut corpora = vec!["/usr/bin", "/usr/share/doc"];
    if Path::new("/usr/lib/python3").is_dir() {
        corpora.push("/usr/lib/python3");
    }
    for dir in corpora {
        let data = tar_sample(dir);
        assert!(
            data.len() > 8 << 20,
            "{dir}: only {} bytes of tar; the comparison needs several gzip members",
            data.len()
        );
        let reference = reference_gzip_level6(&data).len();
        // Two threads: the multi-member path, whatever the machine's core count.
        for threads in [2, 1] {
            let blob = kiln_gzip(&data, threads);
            assert!(
                blob.len() <= reference,
                "{dir}: kiln's gzip ({threads} threads) made {} bytes, level-6 gzip {reference} \
                 ({:.2} %)",
                blob.len(),
                (blob.len() as f64 / reference as f64 - 1.0) * 100.0
            );
            assert!(gunzip(&blob) == data, "{dir}: the blob decodes to its tar");
        }
    }
}
