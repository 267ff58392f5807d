//! Store benchmark (run by `bench/store/run.sh`, release build, as root for overlayfs):
//! diff + gzip of a generated 20,000-file ~200 MB tree and unpacking it back, against
//! `tar -c | gzip -1` and `tar -x` of the same tree in the same run; gzip levels and thread
//! counts on the same tar stream; metadata DB transaction cost.
//!
//! Usage: store_bench [WORK_DIR]   (default: a fresh dir under /var/tmp)

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln_oci::compression::{CompressOptions, Compression, Compressor};
use kiln_store::{ApplyOptions, DiffOptions, ExportOptions, Store};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "struct", "impl", "return", "match", "self", "use", "pub", "mod", "if", "else",
    "for", "while", "loop", "const", "static", "trait", "where", "type", "enum", "true", "false",
    "Some", "None",
];

/// 20,000 files in 200 dirs: text-like sources, random "binaries", and a few big files.
fn generate(root: &Path) -> u64 {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut total = 0u64;
    for d in 0..200 {
        let dir = root.join(format!("pkg{d:03}/src"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let kind = rng.next() % 10;
            let size = match kind {
                0..=5 => 2_000 + (rng.next() % 10_000) as usize, // text
                6..=8 => 4_000 + (rng.next() % 12_000) as usize, // binary
                _ => 1_000 + (rng.next() % 30_000) as usize,
            };
            let mut buf = Vec::with_capacity(size);
            if kind <= 5 || kind == 9 {
                while buf.len() < size {
                    buf.extend_from_slice(
                        WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes(),
                    );
                    buf.push(if rng.next() % 8 == 0 { b'\n' } else { b' ' });
                }
            } else {
                while buf.len() < size {
                    buf.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
            buf.truncate(size);
            total += size as u64;
            fs::write(dir.join(format!("f{f:03}.dat")), &buf).unwrap();
        }
    }
    // A few large files (libraries, assets): half compressible, half not.
    let big = root.join("big");
    fs::create_dir_all(&big).unwrap();
    for i in 0..6 {
        let mut buf = Vec::with_capacity(5 << 20);
        while buf.len() < 5 << 20 {
            if i % 2 == 0 {
                buf.extend_from_slice(WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes());
                buf.push(b' ');
            } else {
                buf.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
        buf.truncate(5 << 20);
        total += buf.len() as u64;
        fs::write(big.join(format!("blob{i}")), &buf).unwrap();
    }
    total
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn sh(cmd: &str) -> f64 {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd} failed");
    secs(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let work: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!("/var/tmp/kiln-store-bench-{}", std::process::id()))
        });
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let reps = 3;
    let store = Store::open(work.join("state")).unwrap();
    println!("snapshotter: {}", store.snapshotter_note());
    println!(
        "cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let a = store.prepare(None, None).unwrap();
    let t = Instant::now();
    let bytes = generate(&a.rootfs);
    println!(
        "generated 20,006 files, {:.1} MB in {:.1}s",
        bytes as f64 / 1e6,
        secs(t)
    );
    let id = store.commit(&a).unwrap();
    let upper = work.join(format!("state/snapshots/{}/fs", id.0));

    // Baseline: GNU tar + gzip -1 of the same dir, and tar -x of the result.
    let tgz = work.join("baseline.tar.gz");
    let tar_gz = median(
        (0..reps)
            .map(|_| {
                sh(&format!(
                    "tar -C {} -cf - . | gzip -1 > {}",
                    upper.display(),
                    tgz.display()
                ))
            })
            .collect(),
    );
    let tgz_size = fs::metadata(&tgz).unwrap().len();
    let plain_tar = work.join("baseline.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        upper.display(),
        plain_tar.display()
    ));
    let tar_x = median(
        (0..reps)
            .map(|i| {
                let d = work.join(format!("x{i}"));
                fs::create_dir_all(&d).unwrap();
                let s = sh(&format!("tar -C {} -xzf {}", d.display(), tgz.display()));
                fs::remove_dir_all(&d).unwrap();
                s
            })
            .collect(),
    );
    // The same, made durable like kiln's unpack (which syncs before recording the snapshot).
    let tar_x_sync = median(
        (0..reps)
            .map(|i| {
                let d = work.join(format!("xs{i}"));
                fs::create_dir_all(&d).unwrap();
                let cmd = format!(
                    "tar -C {} -xzf {} && sync -f {}",
                    d.display(),
                    tgz.display(),
                    d.display()
                );
                let s = sh(&cmd);
                fs::remove_dir_all(&d).unwrap();
                s
            })
            .collect(),
    );

    // kiln: diff (upper dir walk) + tar + sha256 diff id + parallel gzip + blob digest.
    let mut layer = None;
    let export = median(
        (0..reps)
            .map(|i| {
                // A distinct (no-op) clamp per run defeats the export cache.
                let opts = ExportOptions {
                    diff: DiffOptions {
                        source_date_epoch: Some(i64::MAX - i),
                    },
                };
                let t = Instant::now();
                layer = Some(store.export_layer(id, Compression::Gzip, &opts).unwrap());
                secs(t)
            })
            .collect(),
    );
    let layer = layer.unwrap();

    let unpack = median(
        (0..reps)
            .map(|i| {
                let other = Store::open(work.join(format!("unpack{i}"))).unwrap();
                other
                    .content()
                    .put_bytes(&fs::read(store.content().blob_path(&layer.digest)).unwrap())
                    .unwrap();
                let t = Instant::now();
                other
                    .unpack_layer(None, &layer.digest, &ApplyOptions::default(), None)
                    .unwrap();
                let s = secs(t);
                drop(other);
                fs::remove_dir_all(work.join(format!("unpack{i}"))).unwrap();
                s
            })
            .collect(),
    );

    println!();
    println!("| step | kiln | baseline | kiln/baseline |");
    println!("|---|---|---|---|");
    println!("| diff + gzip (kiln default) vs `tar -c \\| gzip -1` | {export:.2}s ({:.1} MB) | {tar_gz:.2}s ({:.1} MB) | {:.2} |", layer.size as f64 / 1e6, tgz_size as f64 / 1e6, export / tar_gz);
    println!("| unpack (gunzip + safe extract + syncfs) vs `tar -xzf` | {unpack:.2}s | {tar_x:.2}s | {:.2} |", unpack / tar_x);
    println!(
        "| unpack vs `tar -xzf && sync -f` | {unpack:.2}s | {tar_x_sync:.2}s | {:.2} |",
        unpack / tar_x_sync
    );

    // Compression alone on the same uncompressed tar stream.
    let mut data = Vec::new();
    fs::File::open(&plain_tar)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    println!();
    println!(
        "compression of the {:.1} MB tar stream alone:",
        data.len() as f64 / 1e6
    );
    println!("| codec | level | threads | MB/s (input) | output MB |");
    println!("|---|---|---|---|---|");
    for (c, level, threads) in [
        (Compression::Gzip, 1, 1),
        (Compression::Gzip, 1, 2),
        (Compression::Gzip, 3, 2),
        (Compression::Gzip, 6, 1),
        (Compression::Gzip, 6, 2),
        (Compression::Zstd, 3, 1),
    ] {
        let opts = CompressOptions {
            gzip_level: level,
            zstd_level: level as i32,
            threads,
            ..Default::default()
        };
        let t = Instant::now();
        let mut w = Compressor::new(Vec::new(), c, &opts).unwrap();
        w.write_all(&data).unwrap();
        let out = w.finish().unwrap();
        let s = secs(t);
        println!(
            "| {c} | {level} | {threads} | {:.0} | {:.1} |",
            data.len() as f64 / 1e6 / s,
            out.len() as f64 / 1e6
        );
    }
    let t = Instant::now();
    let d = kiln_oci::Digest::sha256_of(&data);
    println!(
        "sha256: {:.0} MB/s ({})",
        data.len() as f64 / 1e6 / secs(t),
        &d.hex()[..12]
    );

    // Metadata DB. Back to back, the process keeps the DB open across the burst; with a
    // pause between calls longer than the idle window, every call pays open + close.
    let n = 300;
    let t = Instant::now();
    for i in 0..n {
        store
            .cache_put(format!("k{i}").as_bytes(), b"v", &[], &[], 1)
            .unwrap();
    }
    let put = secs(t) / n as f64 * 1e3;
    let t = Instant::now();
    for _ in 0..n {
        store.get_ref("none").unwrap();
    }
    let read = secs(t) / n as f64 * 1e3;
    let pause = std::time::Duration::from_millis(20);
    let m = 60;
    let mut iso_put = 0.0;
    let mut iso_read = 0.0;
    for i in 0..m {
        std::thread::sleep(pause);
        let t = Instant::now();
        store
            .cache_put(format!("j{i}").as_bytes(), b"v", &[], &[], 1)
            .unwrap();
        iso_put += secs(t);
        std::thread::sleep(pause);
        let t = Instant::now();
        store.get_ref("none").unwrap();
        iso_read += secs(t);
    }
    println!();
    println!("metadata DB, ms per call:");
    println!("| call | in a burst (DB held open) | isolated (open + txn + close) |");
    println!("|---|---|---|");
    println!(
        "| write txn (cache_put) | {put:.2} | {:.2} |",
        iso_put / m as f64 * 1e3
    );
    println!(
        "| read txn (get_ref) | {read:.3} | {:.2} |",
        iso_read / m as f64 * 1e3
    );

    // Clean up: unmount nothing (committed), remove the work dir.
    drop(store);
    let _ = fs::remove_dir_all(&work);
}
