//! Cache keys: sha256 over a canonical, length-prefixed encoding of a vertex's definition and
//! its inputs' keys (or the content digests of what it reads from them).

use std::fmt;

use kiln_oci::{Algorithm, Digest, Hasher};

/// Identifies the result of one build step: equal keys mean the same step on the same inputs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(Digest);

impl CacheKey {
    /// Wraps a digest that is already a cache key (e.g. read back from a cache record).
    pub fn from_digest(d: Digest) -> Self {
        CacheKey(d)
    }

    /// The key as a digest.
    pub fn digest(&self) -> &Digest {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.0)
    }
}

/// Builds a [`CacheKey`]. Every field is tagged and length-prefixed, so no two different
/// sequences of fields encode to the same bytes.
pub struct KeyBuilder {
    hasher: Hasher,
}

/// Bumped whenever the meaning of an encoded field changes, so old records never match.
const KEY_FORMAT: &[u8] = b"kiln cache key v1";

impl KeyBuilder {
    /// Starts a key for a vertex with the given canonical definition bytes.
    pub fn new(definition: &[u8]) -> Self {
        let mut b = KeyBuilder {
            hasher: Hasher::new(Algorithm::Sha256),
        };
        b.field(b'F', KEY_FORMAT);
        b.field(b'D', definition);
        b
    }

    /// Adds an input's key (the input's result is used as a whole).
    pub fn input_key(&mut self, key: &CacheKey) -> &mut Self {
        self.field(b'K', key.0.to_string().as_bytes())
    }

    /// Adds the content digest of what the vertex reads from an input.
    pub fn input_content(&mut self, digest: &Digest) -> &mut Self {
        self.field(b'C', digest.to_string().as_bytes())
    }

    /// Finishes the key.
    pub fn finish(self) -> CacheKey {
        CacheKey(self.hasher.finish())
    }

    fn field(&mut self, tag: u8, bytes: &[u8]) -> &mut Self {
        self.hasher.update(&[tag]);
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(def: &[u8], inputs: &[&CacheKey]) -> CacheKey {
        let mut b = KeyBuilder::new(def);
        for k in inputs {
            b.input_key(k);
        }
        b.finish()
    }

    #[test]
    fn same_definition_and_inputs_give_same_key() {
        let base = key(b"image busybox@sha256:..", &[]);
        assert_eq!(key(b"run ls", &[&base]), key(b"run ls", &[&base]));
    }

    #[test]
    fn input_order_and_boundaries_change_the_key() {
        let a = key(b"a", &[]);
        let b = key(b"b", &[]);
        assert_ne!(key(b"copy", &[&a, &b]), key(b"copy", &[&b, &a]));
        // Moving bytes between the definition and an input must not collide.
        assert_ne!(key(b"ab", &[]), key(b"a", &[&key(b"b", &[])]));
    }

    #[test]
    fn content_digest_and_key_of_same_digest_differ() {
        let d = Digest::sha256_of(b"x");
        let mut by_key = KeyBuilder::new(b"copy");
        by_key.input_key(&CacheKey::from_digest(d.clone()));
        let mut by_content = KeyBuilder::new(b"copy");
        by_content.input_content(&d);
        assert_ne!(by_key.finish(), by_content.finish());
    }
}
