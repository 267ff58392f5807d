//! A small tar (ustar + PAX + GNU long names) reader and writer with hard limits.
//!
//! kiln writes layers itself so their bytes are deterministic (sorted PAX records, no user
//! or group names, no atime/ctime) and reads them itself so every size it trusts is bounded:
//! a PAX or GNU long-name header bigger than `max_header_bytes` is refused before any of it
//! is buffered.
//!
//! The reader takes the shapes other tools write, as Go's `archive/tar` (containerd, Docker)
//! reads them: GNU sparse files in all four encodings GNU tar has used (old GNU `S` entries
//! with extension blocks, and PAX formats 0.0, 0.1 and 1.0) come out as the logical file,
//! holes reported separately so the extractor can leave them unallocated.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

const BLOCK: usize = 512;

/// The type of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (`link` is the target).
    Symlink,
    /// A hard link (`link` is the archive path of the target).
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

impl EntryKind {
    fn flag(self) -> u8 {
        match self {
            EntryKind::File => b'0',
            EntryKind::Hardlink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::Char => b'3',
            EntryKind::Block => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        }
    }
}

/// One entry's header, after PAX and GNU extensions are folded in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    /// Archive path, without a trailing `/`.
    pub path: Vec<u8>,
    /// Entry type.
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Data size (regular files only).
    pub size: u64,
    /// Symlink target or hardlink target path.
    pub link: Vec<u8>,
    /// Device major/minor for char/block devices.
    pub dev: (u32, u32),
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl TarHeader {
    /// A header with everything zero/empty except path and kind.
    pub fn new(path: Vec<u8>, kind: EntryKind) -> Self {
        TarHeader {
            path,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

/// Writes a tar stream.
pub(crate) struct TarWriter<W: Write> {
    out: W,
}

fn put_octal(field: &mut [u8], v: u64) -> bool {
    let width = field.len() - 1;
    let s = format!("{v:0width$o}");
    if s.len() > width {
        return false;
    }
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], val: &[u8]) {
    // "%d %s=%s\n" where the length counts itself.
    let body = key.len() + val.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(val);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        TarWriter { out }
    }

    fn raw_header(
        &mut self,
        name: &[u8],
        flag: u8,
        h: &TarHeader,
        size: u64,
        link: &[u8],
    ) -> io::Result<()> {
        let mut b = [0u8; BLOCK];
        b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        put_octal(&mut b[100..108], u64::from(h.mode & 0o7777));
        put_octal(&mut b[108..116], u64::from(h.uid).min(0o7777777));
        put_octal(&mut b[116..124], u64::from(h.gid).min(0o7777777));
        put_octal(&mut b[124..136], size.min(0o77777777777));
        put_octal(&mut b[136..148], h.mtime.clamp(0, 0o77777777777) as u64);
        b[156] = flag;
        b[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        if matches!(h.kind, EntryKind::Char | EntryKind::Block) && flag != b'x' {
            put_octal(&mut b[329..337], u64::from(h.dev.0));
            put_octal(&mut b[337..345], u64::from(h.dev.1));
        }
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        put_octal(&mut b[148..155], u64::from(sum));
        b[155] = b' ';
        self.out.write_all(&b)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Appends one entry; `data` must yield exactly `h.size` bytes for regular files.
    pub(crate) fn append(&mut self, h: &TarHeader, data: Option<&mut dyn Read>) -> io::Result<()> {
        let mut name = h.path.clone();
        if h.kind == EntryKind::Dir {
            name.push(b'/');
        }
        let size = if h.kind == EntryKind::File { h.size } else { 0 };
        let mut pax = Vec::new();
        // Records in a fixed order (then xattrs sorted) so equal trees give equal bytes.
        if h.link.len() > 100 {
            pax_record(&mut pax, b"linkpath", &h.link);
        }
        if name.len() > 100 {
            pax_record(&mut pax, b"path", &name);
        }
        if size > 0o77777777777 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        if u64::from(h.uid) > 0o7777777 {
            pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
        }
        if u64::from(h.gid) > 0o7777777 {
            pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
        }
        if h.mtime < 0 || h.mtime > 0o77777777777 {
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
        }
        for (k, v) in &h.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let mut pname = b"PaxHeaders/".to_vec();
            let base = name
                .rsplit(|&c| c == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"x");
            pname.extend_from_slice(&base[..base.len().min(80)]);
            let ph = TarHeader {
                mode: 0o644,
                ..TarHeader::new(Vec::new(), EntryKind::File)
            };
            self.raw_header(&pname, b'x', &ph, pax.len() as u64, b"")?;
            self.out.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        self.raw_header(&name, h.kind.flag(), h, size, &h.link)?;
        if size > 0 {
            let data = data.ok_or_else(|| io::Error::other("file entry without data"))?;
            let n = io::copy(&mut data.take(size), &mut self.out)?;
            if n != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} shrank while being archived ({n} of {size} bytes)",
                        String::from_utf8_lossy(&h.path)
                    ),
                ));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        Ok(self.out)
    }
}

/// Why an archive could not be read.
#[derive(Debug)]
pub(crate) enum TarError {
    /// The bytes are not a valid tar (message says where).
    Malformed(String),
    /// A PAX/GNU extension header is bigger than allowed.
    HeaderTooLarge,
    /// The underlying reader failed (includes truncated or corrupt compression).
    Io(io::Error),
}

impl From<io::Error> for TarError {
    fn from(e: io::Error) -> Self {
        TarError::Io(e)
    }
}

/// Reads a tar stream entry by entry.
pub(crate) struct TarReader<R: Read> {
    r: R,
    max_header_bytes: u64,
    /// Stored bytes of the current entry not yet read.
    remaining: u64,
    padding: u64,
    done: bool,
    /// The current entry's data segments (logical offset, length) still ahead, for sparse
    /// files; empty otherwise.
    segments: VecDeque<(u64, u64)>,
    /// Logical position in the current sparse file and its logical size.
    sparse_pos: u64,
    sparse_size: u64,
    sparse: bool,
}

/// One piece of a file entry's logical content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// `n` bytes of data were read into the buffer.
    Data(usize),
    /// The next `n` bytes of the file are a hole (zeros, never stored).
    Hole(u64),
    /// The entry's data is complete.
    End,
}

fn parse_num(field: &[u8]) -> Result<u64, TarError> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // GNU base-256: big-endian, first byte's top bit is the marker.
        if field[0] & 0x40 != 0 {
            return Err(TarError::Malformed("negative base-256 number".into()));
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| TarError::Malformed("number overflows 64 bits".into()))?;
        }
        return Ok(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|&b| b != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let txt =
        std::str::from_utf8(&s).map_err(|_| TarError::Malformed("non-ASCII number".into()))?;
    u64::from_str_radix(txt, 8).map_err(|_| TarError::Malformed(format!("bad octal field {txt:?}")))
}

fn cstr_field(f: &[u8]) -> &[u8] {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    &f[..end]
}

fn parse_pax(data: &[u8], into: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), TarError> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| TarError::Malformed("PAX record without length".into()))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| TarError::Malformed("bad PAX record length".into()))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(TarError::Malformed("PAX record length out of range".into()));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| TarError::Malformed("PAX record without '='".into()))?;
        into.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(())
}

fn pax_num(v: &[u8]) -> Result<u64, TarError> {
    let s = std::str::from_utf8(v).map_err(|_| TarError::Malformed("bad PAX number".into()))?;
    let int = s.split('.').next().unwrap_or("");
    int.parse()
        .map_err(|_| TarError::Malformed(format!("bad PAX number {s:?}")))
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(r: R, max_header_bytes: u64) -> Self {
        TarReader {
            r,
            max_header_bytes,
            remaining: 0,
            padding: 0,
            done: false,
            segments: VecDeque::new(),
            sparse_pos: 0,
            sparse_size: 0,
            sparse: false,
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = self.r.read(&mut buf[..n.min(8192) as usize])?;
            if k == 0 {
                return Err(TarError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive ends in the middle of an entry",
                )));
            }
            n -= k as u64;
        }
        Ok(())
    }

    /// Skips `n` bytes; false when the stream ends first.
    fn skip_to_eof_or(&mut self, mut n: u64) -> Result<bool, TarError> {
        let mut buf = [0u8; BLOCK];
        while n > 0 {
            let k = self.r.read(&mut buf[..n.min(BLOCK as u64) as usize])?;
            if k == 0 {
                return Ok(false);
            }
            n -= k as u64;
        }
        Ok(true)
    }

    fn read_block(&mut self, b: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < BLOCK {
            let k = self.r.read(&mut b[got..])?;
            if k == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(TarError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive ends in the middle of a header",
                )));
            }
            got += k;
        }
        Ok(true)
    }

    fn read_ext(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > self.max_header_bytes {
            return Err(TarError::HeaderTooLarge);
        }
        let mut v = vec![0u8; size as usize];
        self.r.read_exact(&mut v)?;
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.skip(pad)?;
        Ok(v)
    }

    /// The next entry's header, or `None` at the end. The entry's data (for files) can then
    /// be read with [`TarReader::read_data`]; whatever is not read is skipped.
    pub(crate) fn next_header(&mut self) -> Result<Option<TarHeader>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.remaining)?;
        self.remaining = 0;
        // A stream that stops right after the last entry's data, without its padding or the
        // end-of-archive blocks, has ended: `umoci insert` writes layers like that, and Go's
        // archive/tar (containerd, Docker) reads them. Data cut short is still an error.
        let padding = std::mem::take(&mut self.padding);
        if !self.skip_to_eof_or(padding)? {
            self.done = true;
            return Ok(None);
        }
        self.segments.clear();
        self.sparse = false;
        self.sparse_pos = 0;
        self.sparse_size = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut ext_total = 0u64;
        loop {
            let mut b = [0u8; BLOCK];
            if !self.read_block(&mut b)? || b.iter().all(|&x| x == 0) {
                // End of archive (one zero block is enough; a missing trailer is tolerated
                // like GNU tar does).
                self.done = true;
                return Ok(None);
            }
            let stored = parse_num(&b[148..156])?;
            let mut sum: u64 = 0;
            for (i, &x) in b.iter().enumerate() {
                sum += if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(x)
                };
            }
            if sum != stored {
                return Err(TarError::Malformed(format!(
                    "header checksum mismatch (stored {stored}, computed {sum})"
                )));
            }
            let flag = b[156];
            let size = parse_num(&b[124..136])?;
            match flag {
                b'L' | b'K' | b'x' | b'g' => {
                    ext_total += size;
                    if ext_total > self.max_header_bytes {
                        return Err(TarError::HeaderTooLarge);
                    }
                    let data = self.read_ext(size)?;
                    match flag {
                        b'L' => long_name = Some(cstr_field(&data).to_vec()),
                        b'K' => long_link = Some(cstr_field(&data).to_vec()),
                        b'x' => parse_pax(&data, &mut pax)?,
                        _ => {} // global PAX headers carry nothing kiln uses
                    }
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' | b'S' => EntryKind::File,
                b'1' => EntryKind::Hardlink,
                b'2' => EntryKind::Symlink,
                b'3' => EntryKind::Char,
                b'4' => EntryKind::Block,
                b'5' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                other => {
                    return Err(TarError::Malformed(format!(
                        "unsupported entry type {:?}",
                        other as char
                    )))
                }
            };
            let mut path = cstr_field(&b[0..100]).to_vec();
            // Only POSIX ustar has a prefix field; GNU's magic ("ustar  ") keeps atime, ctime
            // and the sparse map there.
            if &b[257..263] == b"ustar\0" {
                let prefix = cstr_field(&b[345..500]);
                if !prefix.is_empty() {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(&path);
                    path = p;
                }
            }
            // Old GNU sparse: up to 4 (offset, length) pairs in the header, more in extension
            // blocks that follow it; the real size is in the header too.
            let mut gnu_map: Option<(Vec<(u64, u64)>, u64)> = None;
            if flag == b'S' {
                let mut map = Vec::new();
                push_sparse_pairs(&b[386..482], &mut map)?;
                let real = parse_num(&b[483..495])?;
                let mut extended = b[482] != 0;
                while extended {
                    ext_total += BLOCK as u64;
                    if ext_total > self.max_header_bytes {
                        return Err(TarError::HeaderTooLarge);
                    }
                    let mut e = [0u8; BLOCK];
                    if !self.read_block(&mut e)? {
                        return Err(TarError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "archive ends in a GNU sparse map",
                        )));
                    }
                    push_sparse_pairs(&e[..504], &mut map)?;
                    extended = e[504] != 0;
                }
                gnu_map = Some((map, real));
            }
            let mut h = TarHeader {
                path,
                kind,
                mode: (parse_num(&b[100..108])? & 0o7777) as u32,
                uid: parse_num(&b[108..116])? as u32,
                gid: parse_num(&b[116..124])? as u32,
                mtime: parse_num(&b[136..148])? as i64,
                size,
                link: cstr_field(&b[157..257]).to_vec(),
                dev: (
                    parse_num(&b[329..337])? as u32,
                    parse_num(&b[337..345])? as u32,
                ),
                xattrs: Vec::new(),
            };
            if let Some(n) = long_name {
                h.path = n;
            }
            if let Some(l) = long_link {
                h.link = l;
            }
            let mut pax_sparse = PaxSparse::default();
            for (k, v) in pax {
                match &k[..] {
                    b"path" => h.path = v,
                    b"linkpath" => h.link = v,
                    b"size" => h.size = pax_num(&v)?,
                    b"uid" => h.uid = pax_num(&v)? as u32,
                    b"gid" => h.gid = pax_num(&v)? as u32,
                    b"mtime" => h.mtime = pax_num(&v)? as i64,
                    b"GNU.sparse.name" => pax_sparse.name = Some(v),
                    b"GNU.sparse.major" => pax_sparse.major = Some(pax_num(&v)?),
                    b"GNU.sparse.minor" => pax_sparse.minor = Some(pax_num(&v)?),
                    b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                        pax_sparse.real_size = Some(pax_num(&v)?)
                    }
                    b"GNU.sparse.offset" => pax_sparse.pending_offset = Some(pax_num(&v)?),
                    b"GNU.sparse.numbytes" => {
                        let off = pax_sparse.pending_offset.take().ok_or_else(|| {
                            TarError::Malformed("GNU.sparse.numbytes without an offset".into())
                        })?;
                        pax_sparse.map.push((off, pax_num(&v)?));
                    }
                    b"GNU.sparse.map" => pax_sparse.map = parse_sparse_list(&v)?,
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            h.xattrs.push((name.to_vec(), v));
                        }
                    }
                }
            }
            h.xattrs.sort();
            if let Some(n) = pax_sparse.name.take() {
                h.path = n;
            }
            while h.path.len() > 1 && h.path.last() == Some(&b'/') {
                h.path.pop();
            }
            // Only regular files carry data; a size on anything else is skipped.
            let data = h.size;
            if kind != EntryKind::File {
                h.size = 0;
            }
            self.remaining = data;
            self.padding = (BLOCK as u64 - data % BLOCK as u64) % BLOCK as u64;
            if kind == EntryKind::File {
                let sparse = match (gnu_map, pax_sparse.real_size) {
                    (Some((map, real)), _) => Some((map, real)),
                    (None, Some(real)) if pax_sparse.major == Some(1) => {
                        if pax_sparse.minor != Some(0) {
                            return Err(TarError::Malformed(format!(
                                "unknown GNU sparse format 1.{}",
                                pax_sparse.minor.unwrap_or(0)
                            )));
                        }
                        Some((self.read_sparse_map_1_0()?, real))
                    }
                    (None, Some(real)) => Some((pax_sparse.map, real)),
                    (None, None) => None,
                };
                if let Some((map, real)) = sparse {
                    self.start_sparse(map, real)?;
                    h.size = real;
                }
            }
            return Ok(Some(h));
        }
    }

    /// PAX sparse format 1.0 keeps its map at the start of the data: decimal numbers, one
    /// per line (the pair count, then offset and length of each pair), padded to a block.
    fn read_sparse_map_1_0(&mut self) -> Result<Vec<(u64, u64)>, TarError> {
        let mut text = Vec::new();
        loop {
            if self.remaining < BLOCK as u64 {
                return Err(TarError::Malformed(
                    "GNU sparse 1.0 map runs past the entry's data".into(),
                ));
            }
            if text.len() as u64 + BLOCK as u64 > self.max_header_bytes {
                return Err(TarError::HeaderTooLarge);
            }
            let mut b = [0u8; BLOCK];
            self.r.read_exact(&mut b)?;
            self.remaining -= BLOCK as u64;
            text.extend_from_slice(&b);
            // The part after the last newline is not a whole number yet.
            let mut lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
            lines.pop();
            let Some(first) = lines.first() else { continue };
            let count = pax_num(first)?;
            let need = count
                .checked_mul(2)
                .and_then(|n| n.checked_add(1))
                .ok_or_else(|| TarError::Malformed("GNU sparse 1.0 map too long".into()))?;
            if (lines.len() as u64) < need {
                continue;
            }
            let nums = lines[1..need as usize]
                .iter()
                .map(|l| pax_num(l))
                .collect::<Result<Vec<u64>, TarError>>()?;
            return Ok(nums.chunks(2).map(|p| (p[0], p[1])).collect());
        }
    }

    /// Checks a sparse map against the stored data and the real size, and starts reading
    /// the entry as that logical file.
    fn start_sparse(&mut self, map: Vec<(u64, u64)>, real: u64) -> Result<(), TarError> {
        let mut end = 0u64;
        let mut stored = 0u64;
        for &(off, len) in &map {
            let seg_end = off
                .checked_add(len)
                .ok_or_else(|| TarError::Malformed("sparse segment overflows".into()))?;
            if off < end || seg_end > real {
                return Err(TarError::Malformed(format!(
                    "sparse map out of order or past the file's size {real} (segment {off}+{len})"
                )));
            }
            end = seg_end;
            stored += len;
        }
        if stored != self.remaining {
            return Err(TarError::Malformed(format!(
                "sparse map holds {stored} bytes but the entry stores {}",
                self.remaining
            )));
        }
        self.segments = map.into_iter().filter(|s| s.1 > 0).collect();
        self.sparse = true;
        self.sparse_pos = 0;
        self.sparse_size = real;
        Ok(())
    }

    fn read_stored(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let k = self.r.read(&mut buf[..n])?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive truncated in file data",
            ));
        }
        self.remaining -= k as u64;
        Ok(k)
    }

    /// Reads the next piece of the current entry's logical content: data into `buf`, or
    /// the length of a hole (sparse files only).
    pub(crate) fn read_piece(&mut self, buf: &mut [u8]) -> io::Result<Piece> {
        if !self.sparse {
            return Ok(match self.read_stored(buf)? {
                0 => Piece::End,
                n => Piece::Data(n),
            });
        }
        let Some(&(off, len)) = self.segments.front() else {
            let hole = self.sparse_size - self.sparse_pos;
            self.sparse_pos = self.sparse_size;
            return Ok(if hole == 0 {
                Piece::End
            } else {
                Piece::Hole(hole)
            });
        };
        if self.sparse_pos < off {
            let hole = off - self.sparse_pos;
            self.sparse_pos = off;
            return Ok(Piece::Hole(hole));
        }
        let left = off + len - self.sparse_pos;
        let want = (buf.len() as u64).min(left) as usize;
        let n = self.read_stored(&mut buf[..want])?;
        self.sparse_pos += n as u64;
        if self.sparse_pos == off + len {
            self.segments.pop_front();
        }
        Ok(Piece::Data(n))
    }

    #[cfg(test)]
    /// Reads the current entry's logical data (holes of sparse files as zeros); 0 at its end.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.sparse {
            return self.read_stored(buf);
        }
        if buf.is_empty() || self.sparse_pos == self.sparse_size {
            return Ok(0);
        }
        let next_data = self
            .segments
            .front()
            .map_or(self.sparse_size, |&(off, _)| off);
        if self.sparse_pos < next_data {
            let n = (buf.len() as u64).min(next_data - self.sparse_pos) as usize;
            buf[..n].fill(0);
            self.sparse_pos += n as u64;
            return Ok(n);
        }
        match self.read_piece(buf)? {
            Piece::Data(n) => Ok(n),
            Piece::Hole(_) | Piece::End => Ok(0),
        }
    }
}

/// The GNU sparse records of one entry's PAX header.
#[derive(Default)]
struct PaxSparse {
    name: Option<Vec<u8>>,
    major: Option<u64>,
    minor: Option<u64>,
    real_size: Option<u64>,
    pending_offset: Option<u64>,
    map: Vec<(u64, u64)>,
}

/// Appends the (offset, length) pairs of an old GNU sparse map area (12-byte numbers,
/// zero pairs mark unused slots).
fn push_sparse_pairs(area: &[u8], into: &mut Vec<(u64, u64)>) -> Result<(), TarError> {
    for pair in area.chunks_exact(24) {
        if pair.iter().all(|&b| b == 0) {
            continue;
        }
        into.push((parse_num(&pair[..12])?, parse_num(&pair[12..])?));
    }
    Ok(())
}

/// Parses PAX sparse format 0.1's `GNU.sparse.map` ("offset,length,offset,length...").
fn parse_sparse_list(v: &[u8]) -> Result<Vec<(u64, u64)>, TarError> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let nums = v
        .split(|&b| b == b',')
        .map(pax_num)
        .collect::<Result<Vec<u64>, TarError>>()?;
    if nums.len() % 2 != 0 {
        return Err(TarError::Malformed(
            "GNU.sparse.map has an odd number of values".into(),
        ));
    }
    Ok(nums.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// Lists every entry header of an (uncompressed) tar stream.
pub(crate) fn list_headers<R: Read>(r: R) -> Result<Vec<TarHeader>, TarError> {
    let mut t = TarReader::new(r, 1 << 20);
    let mut out = Vec::new();
    while let Some(h) = t.next_header()? {
        out.push(h);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_xattrs_and_data_round_trip() {
        let long = vec![b'a'; 180];
        let mut w = TarWriter::new(Vec::new());
        let mut f = TarHeader::new(long.clone(), EntryKind::File);
        f.size = 5;
        f.mode = 0o4755;
        f.uid = 3_000_000;
        f.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 0xff])];
        w.append(&f, Some(&mut &b"hello"[..])).unwrap();
        let mut l = TarHeader::new(b"l".to_vec(), EntryKind::Symlink);
        l.link = vec![b'b'; 150];
        w.append(&l, None).unwrap();
        let tar = w.finish().unwrap();
        let mut r = TarReader::new(&tar[..], 1 << 20);
        let h = r.next_header().unwrap().unwrap();
        assert_eq!(h, f);
        let mut buf = [0u8; 16];
        let n = r.read_data(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(r.next_header().unwrap().unwrap(), l);
        assert!(r.next_header().unwrap().is_none());
    }

    #[test]
    fn a_stream_ending_after_the_last_data_without_padding_or_trailer_is_complete() {
        let mut w = TarWriter::new(Vec::new());
        let mut f = TarHeader::new(b"f".to_vec(), EntryKind::File);
        f.size = 9;
        w.append(&f, Some(&mut &b"inserted\n"[..])).unwrap();
        let mut tar = w.finish().unwrap();
        tar.truncate(512 + 9);
        let mut r = TarReader::new(&tar[..], 1 << 20);
        assert_eq!(r.next_header().unwrap().unwrap(), f);
        let mut buf = [0u8; 16];
        assert_eq!(r.read_data(&mut buf).unwrap(), 9);
        assert!(r.next_header().unwrap().is_none());
        // Cut inside the data, it is still truncated.
        let mut r = TarReader::new(&tar[..512 + 5], 1 << 20);
        r.next_header().unwrap().unwrap();
        let mut got = 0;
        let err = loop {
            match r.read_data(&mut buf) {
                Ok(0) => panic!("short data read as complete"),
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(got, 5);
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn oversized_pax_header_is_refused_before_buffering() {
        let mut w = TarWriter::new(Vec::new());
        let mut f = TarHeader::new(b"x".to_vec(), EntryKind::File);
        f.xattrs = vec![(b"user.big".to_vec(), vec![b'z'; 5000])];
        w.append(&f, None).unwrap();
        let tar = w.finish().unwrap();
        let mut r = TarReader::new(&tar[..], 1024);
        assert!(matches!(r.next_header(), Err(TarError::HeaderTooLarge)));
    }
}
