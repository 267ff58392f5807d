//! The solver: cache keys per vertex, a parallel deduplicating scheduler, and cache lookup
//! through a trait (local store, then imported remote caches).
