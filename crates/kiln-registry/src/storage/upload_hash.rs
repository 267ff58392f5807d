//! Streaming hash state of open uploads, kept across chunks so each byte is hashed once.
//!
//! A driver that stages upload data keeps one [`UploadHashes`]: an entry per open upload,
//! keyed by `(repository, upload id)`, whose lock also serialises that upload's chunks. The
//! state is only a cache: lost (restart, eviction), the staged data is hashed again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kiln_oci::Hasher;

/// Hash state of one upload: `(bytes hashed, hasher)`, behind a lock that also serialises
/// its chunks. `None` until a chunk has been hashed.
pub(crate) type UploadHash = Arc<tokio::sync::Mutex<Option<(u64, Hasher)>>>;

/// The hash states of open uploads, bounded: past `cap` the least recently used idle entry
/// is dropped. Entries are made only for uploads that exist (the driver checks before
/// [`insert`](Self::insert)), so requests naming made-up uploads add none, and no client can
/// flush another's state wholesale (a dropped entry only costs that upload one re-hash).
pub(crate) struct UploadHashes {
    states: Mutex<HashStates>,
}

impl UploadHashes {
    /// An empty set holding at most about `cap` idle entries.
    pub(crate) fn new(cap: usize) -> UploadHashes {
        UploadHashes {
            states: Mutex::new(HashStates {
                cap,
                ..HashStates::default()
            }),
        }
    }

    fn states(&self) -> std::sync::MutexGuard<'_, HashStates> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of an upload, if one is held (marks it used).
    pub(crate) fn get(&self, repo: &str, id: &str) -> Option<UploadHash> {
        self.states().get(&(repo.to_owned(), id.to_owned()))
    }

    /// The entry of an upload known to exist, made if missing.
    pub(crate) fn insert(&self, repo: &str, id: &str) -> UploadHash {
        self.states().insert((repo.to_owned(), id.to_owned()))
    }

    /// Drops an upload's entry (finished or cancelled).
    pub(crate) fn forget(&self, repo: &str, id: &str) {
        self.states()
            .entries
            .remove(&(repo.to_owned(), id.to_owned()));
    }

    /// `(repository, id)` of uploads a request is working on right now (it holds their entry).
    pub(crate) fn busy(&self) -> HashSet<(String, String)> {
        self.states().busy()
    }

    /// How many entries are held.
    pub(crate) fn len(&self) -> usize {
        self.states().entries.len()
    }
}

#[derive(Default)]
struct HashStates {
    entries: HashMap<(String, String), (u64, UploadHash)>,
    /// Use counter: the entry with the smallest stamp is the least recently used.
    clock: u64,
    cap: usize,
}

impl HashStates {
    fn get(&mut self, key: &(String, String)) -> Option<UploadHash> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(used, h)| {
            *used = now;
            h.clone()
        })
    }

    fn busy(&self) -> HashSet<(String, String)> {
        self.entries
            .iter()
            .filter(|(_, (_, h))| Arc::strong_count(h) > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn insert(&mut self, key: (String, String)) -> UploadHash {
        if let Some(h) = self.get(&key) {
            return h;
        }
        if self.entries.len() >= self.cap {
            // Only idle entries may go: a request holding one is writing a chunk, and a
            // second lock for the same upload would let two chunks interleave.
            let oldest = self
                .entries
                .iter()
                .filter(|(_, (_, h))| Arc::strong_count(h) == 1)
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        let h = UploadHash::default();
        self.entries.insert(key, (self.clock, h.clone()));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> (String, String) {
        ("repo".to_owned(), id.to_owned())
    }

    #[test]
    fn hash_states_evict_the_least_recently_used_idle_entry() {
        let mut m = HashStates {
            cap: 2,
            ..HashStates::default()
        };
        m.insert(key("a"));
        m.insert(key("b"));
        // `a` used again: `b` is now the least recently used.
        assert!(m.get(&key("a")).is_some());
        m.insert(key("c"));
        assert_eq!(m.entries.len(), 2);
        assert!(m.entries.contains_key(&key("a")));
        assert!(m.entries.contains_key(&key("c")));
        assert!(!m.entries.contains_key(&key("b")));
    }

    #[test]
    fn hash_states_never_evict_an_entry_in_use() {
        let mut m = HashStates {
            cap: 1,
            ..HashStates::default()
        };
        let held = m.insert(key("a"));
        let again = m.insert(key("b"));
        // `a` is being written by a request: it stays, and the map grows past its cap
        // rather than handing a second lock for `a` to the next request.
        assert!(Arc::ptr_eq(&held, &m.get(&key("a")).expect("a kept")));
        assert_eq!(m.entries.len(), 2);
        drop((held, again));
        m.insert(key("c"));
        assert_eq!(m.entries.len(), 2, "one idle entry evicted at the cap");
    }
}
