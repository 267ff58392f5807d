//! Layer compression: gzip (flate2 on the pure-Rust zlib-rs backend) and zstd, detection by
//! magic bytes, and a gzip writer that compresses large streams on several threads.
//!
//! Single-core gzip is the slowest step of exporting a layer, so [`GzipWriter`] cuts its input
//! into chunks and deflates them on worker threads, writing each chunk as its own gzip member in
//! input order. RFC 1952 §2.2 allows a gzip file to be a series of members; every gzip reader
//! used with OCI registries (Go's `compress/gzip`, zlib's `gunzip`, flate2's `MultiGzDecoder`)
//! reads them as one stream.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How a layer blob is compressed. Serialized as its [`Compression::name`] (the build
/// options of an `--output` carry it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar stream.
    Uncompressed,
    /// gzip (RFC 1952), possibly several members.
    Gzip,
    /// zstd (RFC 8878).
    Zstd,
}

impl Compression {
    /// The short name used in flags and records: `uncompressed`, `gzip`, `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The OCI layer media type for a tar with this compression.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::Uncompressed => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Recognises a stream by its first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`); anything
    /// else is taken as an uncompressed tar.
    pub fn detect(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::Uncompressed
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A compression name that kiln does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?} (use gzip, zstd or uncompressed)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uncompressed" | "none" => Ok(Compression::Uncompressed),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(UnknownCompression(s.to_owned())),
        }
    }
}

/// The gzip level kiln uses unless told otherwise. BuildKit writes layers with Go's default
/// gzip level (6); kiln's layers are cut into members compressed on several threads, which
/// costs about 0.1 % at the same level, so kiln uses 7: on a Debian rootfs, a node_modules
/// tree, Python sources and ELF binaries its blobs come out 0.1-0.7 % smaller than one
/// level-6 stream of the same tar (`docs/compression.md` has the measurements; level 1 made
/// them 21-43 % larger).
pub const DEFAULT_GZIP_LEVEL: u32 = 7;
/// The zstd level kiln uses unless told otherwise (zstd's own default).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Settings for [`Compressor::new`].
#[derive(Debug, Clone, Copy)]
pub struct CompressOptions {
    /// gzip level 0-9.
    pub gzip_level: u32,
    /// zstd level 1-19.
    pub zstd_level: i32,
    /// Worker threads for gzip; 1 compresses the same members inline.
    pub threads: usize,
    /// Input bytes per gzip member when threads > 1.
    pub chunk_size: usize,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            gzip_level: DEFAULT_GZIP_LEVEL,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            chunk_size: 4 << 20,
        }
    }
}

/// A writer that compresses everything written to it into `W`. Call [`Compressor::finish`]
/// to flush the trailer and get `W` back; dropping it without finishing loses the tail.
pub enum Compressor<W: Write> {
    /// No compression: bytes pass through.
    Plain(W),
    /// gzip, single or multi-member.
    Gzip(Box<GzipWriter<W>>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    /// Starts compressing into `out`.
    pub fn new(out: W, compression: Compression, opts: &CompressOptions) -> io::Result<Self> {
        Ok(match compression {
            Compression::Uncompressed => Compressor::Plain(out),
            Compression::Gzip => Compressor::Gzip(Box::new(GzipWriter::new(out, opts))),
            Compression::Zstd => {
                Compressor::Zstd(zstd::stream::write::Encoder::new(out, opts.zstd_level)?)
            }
        })
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Plain(w) => Ok(w),
            Compressor::Gzip(g) => (*g).finish(),
            Compressor::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gzip(g) => g.write(buf),
            Compressor::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gzip(g) => g.flush(),
            Compressor::Zstd(z) => z.flush(),
        }
    }
}

type Job = (u64, Vec<u8>);
type Done = (u64, io::Result<Vec<u8>>);

/// A gzip writer that cuts its input into chunks, deflates each chunk as its own gzip member
/// and writes the members in input order: on worker threads, or inline with one thread. The
/// output depends only on the input, the level and the chunk size, never on the thread count.
pub struct GzipWriter<W: Write> {
    out: Option<W>,
    level: u32,
    chunk_size: usize,
    buf: Vec<u8>,
    next_seq: u64,
    next_out: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    in_flight: usize,
    max_in_flight: usize,
    jobs: Option<mpsc::SyncSender<Job>>,
    done: Option<mpsc::Receiver<Done>>,
    workers: Vec<JoinHandle<()>>,
}

/// Bytes of each probe [`member_strategy`] compresses both ways.
const PROBE_BYTES: usize = 64 << 10;

/// The deflate strategy for one member: zlib's default, or `Filtered`, which leaves out
/// matches of 5 bytes or fewer. Short matches cost more bits than the literals they replace
/// when literals are cheap — text over a small alphabet such as hex digests, lock files,
/// minified or generated sources — and there `Filtered` is 10-13 % smaller at the same level
/// (Go's deflate, which BuildKit uses, never emits matches shorter than 4 bytes); on ELF
/// binaries and most other content it is 5-10 % larger. Both are tried on three 64 KiB
/// probes (start, middle, end) of the member, and the member is compressed with the
/// smaller; a member of up to four probes is compressed whole both ways.
fn member_strategy(level: u32, data: &[u8]) -> io::Result<zlib_rs::Strategy> {
    use zlib_rs::Strategy;
    let probes: Vec<&[u8]> = if data.len() <= 4 * PROBE_BYTES {
        vec![data]
    } else {
        let mid = data.len() / 2 - PROBE_BYTES / 2;
        let end = data.len() - PROBE_BYTES;
        vec![
            &data[..PROBE_BYTES],
            &data[mid..mid + PROBE_BYTES],
            &data[end..],
        ]
    };
    let mut sizes = [0usize; 2];
    for (size, strategy) in sizes
        .iter_mut()
        .zip([Strategy::Default, Strategy::Filtered])
    {
        for p in &probes {
            *size += deflate_member(level, strategy, p)?.len();
        }
    }
    Ok(if sizes[1] < sizes[0] {
        Strategy::Filtered
    } else {
        Strategy::Default
    })
}

/// One gzip member of `data` (header with mtime 0 and no name, so the output depends only on
/// the input, the level and the strategy).
fn deflate_member(level: u32, strategy: zlib_rs::Strategy, data: &[u8]) -> io::Result<Vec<u8>> {
    let config = zlib_rs::DeflateConfig {
        level: level.min(9) as i32,
        method: zlib_rs::Method::Deflated,
        // 15 bits of window, +16: a gzip header and trailer around the deflate stream.
        window_bits: 31,
        mem_level: 8,
        strategy,
    };
    // The gzip header and trailer (18 bytes) on top of zlib's bound for a zlib stream.
    let mut out = vec![0u8; zlib_rs::compress_bound(data.len()) + 32];
    let (written, rc) = zlib_rs::compress_slice(&mut out, data, config);
    if rc != zlib_rs::ReturnCode::Ok {
        return Err(io::Error::other(format!("deflate failed: {rc:?}")));
    }
    let n = written.len();
    out.truncate(n);
    Ok(out)
}

fn gzip_member(level: u32, data: &[u8]) -> io::Result<Vec<u8>> {
    let strategy = if level == 0 {
        zlib_rs::Strategy::Default
    } else {
        member_strategy(level, data)?
    };
    deflate_member(level, strategy, data)
}

impl<W: Write> GzipWriter<W> {
    /// Starts a gzip stream into `out`.
    pub fn new(out: W, opts: &CompressOptions) -> Self {
        let level = opts.gzip_level.min(9);
        let mut w = GzipWriter {
            out: Some(out),
            level,
            chunk_size: opts.chunk_size.max(64 << 10),
            buf: Vec::new(),
            next_seq: 0,
            next_out: 0,
            pending: BTreeMap::new(),
            in_flight: 0,
            max_in_flight: opts.threads * 2,
            jobs: None,
            done: None,
            workers: Vec::new(),
        };
        if opts.threads <= 1 {
            return w;
        }
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(opts.threads);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..opts.threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            w.workers.push(std::thread::spawn(move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((seq, data)) = job else { return };
                if done_tx.send((seq, gzip_member(level, &data))).is_err() {
                    return;
                }
            }));
        }
        w.jobs = Some(job_tx);
        w.done = Some(done_rx);
        w
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
        let Some(jobs) = self.jobs.as_ref() else {
            // One thread: the member is made here.
            let member = gzip_member(self.level, &data)?;
            self.next_seq += 1;
            self.next_out += 1;
            return self
                .out
                .as_mut()
                .ok_or_else(|| io::Error::other("gzip writer finished"))?
                .write_all(&member);
        };
        let jobs = jobs.clone();
        while self.in_flight >= self.max_in_flight {
            self.collect_one()?;
        }
        jobs.send((self.next_seq, data))
            .map_err(|_| io::Error::other("gzip worker thread stopped"))?;
        self.next_seq += 1;
        self.in_flight += 1;
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        let done = self
            .done
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip workers gone"))?;
        let (seq, res) = done
            .recv()
            .map_err(|_| io::Error::other("gzip worker thread stopped"))?;
        self.in_flight -= 1;
        self.pending.insert(seq, res?);
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip writer finished"))?;
        while let Some(member) = self.pending.remove(&self.next_out) {
            out.write_all(&member)?;
            self.next_out += 1;
        }
        Ok(())
    }

    /// Compresses what is buffered, writes every member and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.next_seq == 0 && self.buf.is_empty() {
            // An empty input still has to be a valid gzip stream.
            let member = gzip_member(self.level, &[])?;
            let out = self
                .out
                .as_mut()
                .ok_or_else(|| io::Error::other("gzip writer finished"))?;
            out.write_all(&member)?;
        } else {
            self.submit()?;
        }
        while self.in_flight > 0 {
            self.collect_one()?;
        }
        self.jobs = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        self.out
            .take()
            .ok_or_else(|| io::Error::other("gzip writer finished"))
    }
}

impl<W: Write> Write for GzipWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.chunk_size {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Members are only complete at chunk boundaries; flushing the inner writer is all
        // that can be done without changing the output.
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl<W: Write> Drop for GzipWriter<W> {
    fn drop(&mut self) {
        self.jobs = None;
        // Drain so workers blocked on `send` can exit, then join them.
        if let Some(done) = self.done.take() {
            drop(done);
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Wraps `input` in the decompressor its first bytes call for (gzip, zstd or none) and says
/// which one it chose. Multi-member gzip streams are read to the end.
pub fn decompressing_reader<'a, R: BufRead + 'a>(
    mut input: R,
) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let kind = {
        let head = input.fill_buf()?;
        // A short first read could hide the magic; the first fill of a BufReader over a file
        // or a decompressor always returns at least 4 bytes unless the stream is shorter.
        Compression::detect(head)
    };
    let reader: Box<dyn Read + 'a> = match kind {
        Compression::Uncompressed => Box::new(input),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
    };
    Ok((kind, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_serializes_as_its_flag_name() {
        for c in [
            Compression::Gzip,
            Compression::Zstd,
            Compression::Uncompressed,
        ] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
            assert_eq!(serde_json::from_str::<Compression>(&json).unwrap(), c);
        }
    }

    fn sample(n: usize) -> Vec<u8> {
        // Compressible but not trivial: a counter rendered as text.
        let mut v = Vec::with_capacity(n);
        let mut i = 0u64;
        while v.len() < n {
            v.extend_from_slice(format!("line {i} {}\n", i * 2654435761 % 1000).as_bytes());
            i += 1;
        }
        v.truncate(n);
        v
    }

    fn roundtrip(c: Compression, opts: &CompressOptions, data: &[u8]) -> Vec<u8> {
        let mut w = Compressor::new(Vec::new(), c, opts).unwrap();
        for part in data.chunks(7777) {
            w.write_all(part).unwrap();
        }
        let blob = w.finish().unwrap();
        assert_eq!(Compression::detect(&blob), c);
        let (kind, mut r) = decompressing_reader(io::BufReader::new(&blob[..])).unwrap();
        assert_eq!(kind, c);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        blob_is_nonempty(&blob);
        back
    }

    fn blob_is_nonempty(b: &[u8]) {
        assert!(!b.is_empty());
    }

    #[test]
    fn parallel_gzip_members_decode_to_the_input() {
        let data = sample(3 << 20);
        let opts = CompressOptions {
            threads: 3,
            chunk_size: 100_000,
            ..Default::default()
        };
        assert_eq!(roundtrip(Compression::Gzip, &opts, &data), data);
    }

    #[test]
    fn parallel_gzip_output_is_deterministic() {
        let data = sample(1 << 20);
        let opts = CompressOptions {
            threads: 4,
            chunk_size: 65536,
            ..Default::default()
        };
        let a = {
            let mut w = GzipWriter::new(Vec::new(), &opts);
            w.write_all(&data).unwrap();
            w.finish().unwrap()
        };
        let b = {
            let mut w = GzipWriter::new(Vec::new(), &opts);
            w.write_all(&data).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn gzip_output_is_the_same_on_any_thread_count() {
        let data = sample(3 << 20);
        let blobs: Vec<Vec<u8>> = [1, 2, 3]
            .iter()
            .map(|&threads| {
                let opts = CompressOptions {
                    threads,
                    chunk_size: 1 << 20,
                    ..Default::default()
                };
                let mut w = GzipWriter::new(Vec::new(), &opts);
                w.write_all(&data).unwrap();
                w.finish().unwrap()
            })
            .collect();
        assert_eq!(blobs[0], blobs[1]);
        assert_eq!(blobs[0], blobs[2]);
    }

    /// Lines of hex digits (a lock file, generated code): short matches cost more than the
    /// literals they replace, so the member is compressed with `Filtered`.
    #[test]
    fn hex_text_members_leave_out_short_matches() {
        let mut data = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while data.len() < 1 << 20 {
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(format!("{x:016x}").as_bytes());
            }
            data.push(b'\n');
        }
        assert_eq!(
            member_strategy(DEFAULT_GZIP_LEVEL, &data).unwrap(),
            zlib_rs::Strategy::Filtered
        );
        let chosen = gzip_member(DEFAULT_GZIP_LEVEL, &data).unwrap().len();
        let default =
            deflate_member(DEFAULT_GZIP_LEVEL, zlib_rs::Strategy::Default, &data).unwrap();
        assert!(
            chosen < default.len(),
            "{chosen} bytes, default strategy {}",
            default.len()
        );
        // Machine code is the other way round: this test's own executable.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let code = &exe[..exe.len().min(1 << 20)];
        assert_eq!(
            member_strategy(DEFAULT_GZIP_LEVEL, code).unwrap(),
            zlib_rs::Strategy::Default
        );
    }

    #[test]
    fn empty_inputs_make_valid_streams() {
        for c in [Compression::Gzip, Compression::Zstd] {
            for threads in [1, 2] {
                let opts = CompressOptions {
                    threads,
                    ..Default::default()
                };
                assert!(roundtrip(c, &opts, b"").is_empty());
            }
        }
    }

    #[test]
    fn zstd_and_single_thread_gzip_round_trip() {
        let data = sample(500_000);
        let opts = CompressOptions {
            threads: 1,
            ..Default::default()
        };
        assert_eq!(roundtrip(Compression::Gzip, &opts, &data), data);
        assert_eq!(roundtrip(Compression::Zstd, &opts, &data), data);
        assert_eq!(roundtrip(Compression::Uncompressed, &opts, &data), data);
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let data = sample(200_000);
        let opts = CompressOptions {
            threads: 1,
            ..Default::default()
        };
        let mut w = Compressor::new(Vec::new(), Compression::Gzip, &opts).unwrap();
        w.write_all(&data).unwrap();
        let blob = w.finish().unwrap();
        let cut = &blob[..blob.len() / 2];
        let (_, mut r) = decompressing_reader(io::BufReader::new(cut)).unwrap();
        let mut back = Vec::new();
        assert!(r.read_to_end(&mut back).is_err());
    }

    #[test]
    fn names_parse_back() {
        for c in [
            Compression::Uncompressed,
            Compression::Gzip,
            Compression::Zstd,
        ] {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
        }
        assert!("lz4".parse::<Compression>().is_err());
    }
}
