//! SHA-256 whose state can be written down and taken up again elsewhere: an upload's running
//! hash lives in the object store beside its data, so whichever registry process takes the
//! next chunk hashes only that chunk.
//!
//! The compression function is `sha2`'s; this file keeps only what a hasher keeps between
//! blocks (the eight state words, the length, the unfinished block) and the padding of
//! FIPS 180-4 §5.1.1.

use kiln_oci::{Algorithm, Digest};
use sha2::digest::generic_array::GenericArray;

/// The initial hash value of SHA-256 (FIPS 180-4 §5.3.3).
const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 computation in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes hashed so far, the unfinished block included.
    len: u64,
    /// The unfinished block (under 64 bytes).
    pending: Vec<u8>,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        ResumableSha256 {
            state: INITIAL,
            len: 0,
            pending: Vec::with_capacity(64),
        }
    }
}

impl ResumableSha256 {
    /// Hashes `data` after what came before.
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (64 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 64 {
                return;
            }
            let block = std::mem::take(&mut self.pending);
            self.compress(&block);
        }
        let mut blocks = data.chunks_exact(64);
        for b in &mut blocks {
            self.compress(b);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    fn compress(&mut self, block: &[u8]) {
        sha2::compress256(
            &mut self.state,
            std::slice::from_ref(GenericArray::from_slice(block)),
        );
    }

    /// How many bytes have been hashed.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The digest of everything hashed so far (the state stays as it is).
    pub(crate) fn digest(&self) -> Digest {
        let mut h = self.clone();
        let bits = h.len.wrapping_mul(8);
        let mut tail = std::mem::take(&mut h.pending);
        tail.push(0x80);
        while tail.len() % 64 != 56 {
            tail.push(0);
        }
        tail.extend_from_slice(&bits.to_be_bytes());
        for b in tail.chunks_exact(64) {
            h.compress(b);
        }
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(h.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Digest::new(Algorithm::Sha256, &hex::encode(out))
            .expect("64 hex digits make a sha256 digest")
    }

    /// The state as text: `LEN:STATE-HEX:PENDING-HEX`.
    pub(crate) fn to_text(&self) -> String {
        let mut words = [0u8; 32];
        for (o, w) in words.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        format!(
            "{}:{}:{}",
            self.len,
            hex::encode(words),
            hex::encode(&self.pending)
        )
    }

    /// Reads what [`to_text`](Self::to_text) wrote; `None` when it is not such a state.
    pub(crate) fn from_text(s: &str) -> Option<ResumableSha256> {
        let mut it = s.split(':');
        let len: u64 = it.next()?.parse().ok()?;
        let words = hex::decode(it.next()?).ok()?;
        let pending = hex::decode(it.next()?).ok()?;
        if it.next().is_some() || words.len() != 32 || pending.len() >= 64 {
            return None;
        }
        if len % 64 != pending.len() as u64 {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, b) in state.iter_mut().zip(words.chunks_exact(4)) {
            *w = u32::from_be_bytes(b.try_into().ok()?);
        }
        Some(ResumableSha256 {
            state,
            len,
            pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_hash_equals_the_one_pass_digest() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0, 1, 55, 56, 63, 64, 65, 127, 128, 1000, 4999, 5000] {
            let mut a = ResumableSha256::default();
            a.update(&data[..cut]);
            let mut b = ResumableSha256::from_text(&a.to_text()).expect("state reads back");
            b.update(&data[cut..]);
            assert_eq!(b.len(), data.len() as u64);
            assert_eq!(b.digest(), Digest::sha256_of(&data), "cut at {cut}");
        }
        assert_eq!(ResumableSha256::default().digest(), Digest::sha256_of(b""));
    }

    #[test]
    fn damaged_state_is_refused() {
        let mut h = ResumableSha256::default();
        h.update(b"abc");
        let text = h.to_text();
        assert!(ResumableSha256::from_text(&text).is_some());
        for bad in [
            "",
            "3",
            "4:00:616263",
            &text.replacen("3:", "5:", 1),
            &format!("{text}:x"),
        ] {
            assert!(ResumableSha256::from_text(bad).is_none(), "{bad}");
        }
    }
}
