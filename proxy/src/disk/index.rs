//! What the disk tier holds, in memory: each stored blob and manifest with its size and last use,
//! and the pure least-recently-used eviction plan over them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use larder_core::digest::Digest;

/// Last use is written to a file's mtime at most this often per entry.
const PERSIST_EVERY: Duration = Duration::from_secs(60);
/// What the index holds: one stored blob or manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Blob(Digest),
    Manifest(Digest),
}

/// The bytes down to which eviction frees space once the limit is reached (90%), so that a
/// full disk does not evict on every insert.
pub fn low_water(max: u64) -> u64 {
    max - max / 10
}

/// Which entries to evict, least recently used first, so that `incoming` more bytes fit.
///
/// `entries` are `(key, size, last_used)`, where a larger `last_used` is more recent; ties go
/// in slice order. Nothing is evicted while `used + incoming <= max`; past that, entries go
/// until `used + incoming` is at most the [`low_water`] mark (or at most `max` when `incoming`
/// alone is above the mark). When `incoming > max` nothing can make room and nothing is
/// evicted: the caller does not keep such content.
pub fn plan_eviction<K: Clone>(
    entries: &[(K, u64, u64)],
    used: u64,
    max: u64,
    incoming: u64,
) -> Vec<K> {
    if incoming > max || used.saturating_add(incoming) <= max {
        return Vec::new();
    }
    let low = low_water(max);
    let goal = if incoming <= low { low } else { max };
    let mut oldest_first: Vec<&(K, u64, u64)> = entries.iter().collect();
    oldest_first.sort_by_key(|&(_, _, last_used)| *last_used);
    let mut remaining = used;
    let mut victims = Vec::new();
    for (key, size, _) in oldest_first {
        if remaining.saturating_add(incoming) <= goal {
            break;
        }
        remaining = remaining.saturating_sub(*size);
        victims.push(key.clone());
    }
    victims
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) size: u64,
    /// A logical clock: larger is more recent (no ties, unlike wall-clock times).
    last_used: u64,
    /// When last use was last written to the file's mtime.
    persisted: Instant,
}

/// The in-memory view of what is on disk.
#[derive(Debug, Default)]
pub(super) struct Index {
    entries: HashMap<Key, Entry>,
    pub(super) used: u64,
    clock: u64,
    pub(super) blobs: u64,
    pub(super) manifests: u64,
    pub(super) evictions: u64,
}

impl Index {
    pub(super) fn insert(&mut self, key: Key, size: u64, persisted: Instant) {
        self.clock += 1;
        let entry = Entry {
            size,
            last_used: self.clock,
            persisted,
        };
        let is_blob = matches!(key, Key::Blob(_));
        match self.entries.insert(key, entry) {
            Some(old) => self.used = self.used.saturating_sub(old.size),
            None if is_blob => self.blobs += 1,
            None => self.manifests += 1,
        }
        self.used = self.used.saturating_add(size);
    }

    pub(super) fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    pub(super) fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.used = self.used.saturating_sub(entry.size);
        match key {
            Key::Blob(_) => self.blobs = self.blobs.saturating_sub(1),
            Key::Manifest(_) => self.manifests = self.manifests.saturating_sub(1),
        }
        Some(entry)
    }

    /// Marks `key` used. Returns its size and whether its mtime is due to be rewritten.
    pub(super) fn touch(&mut self, key: &Key, now: Instant) -> Option<(u64, bool)> {
        let entry = self.entries.get_mut(key)?;
        self.clock += 1;
        entry.last_used = self.clock;
        let persist = now.duration_since(entry.persisted) >= PERSIST_EVERY;
        if persist {
            entry.persisted = now;
        }
        Some((entry.size, persist))
    }

    /// Takes out of the index what [`plan_eviction`] picks to make room for `incoming` bytes;
    /// the caller deletes the files.
    pub(super) fn take_victims(&mut self, max: u64, incoming: u64) -> Vec<(Key, u64)> {
        if self.used.saturating_add(incoming) <= max {
            return Vec::new();
        }
        let entries: Vec<(Key, u64, u64)> = self
            .entries
            .iter()
            .map(|(key, e)| (key.clone(), e.size, e.last_used))
            .collect();
        let plan = plan_eviction(&entries, self.used, max, incoming);
        let mut victims = Vec::with_capacity(plan.len());
        for key in plan {
            if let Some(entry) = self.remove(&key) {
                self.evictions += 1;
                victims.push((key, entry.size));
            }
        }
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_evicts_nothing_under_the_limit() {
        let entries = [("a", 40, 1), ("b", 40, 2)];
        assert!(plan_eviction(&entries, 80, 100, 20).is_empty());
        assert!(plan_eviction(&entries, 80, 100, 0).is_empty());
    }

    #[test]
    fn plan_evicts_least_recently_used_down_to_low_water() {
        // Slice order is not age order: last_used decides.
        let entries = [("new", 30, 9), ("old", 30, 1), ("mid", 30, 5)];
        // 90 + 20 > 100; goal 90: evicting "old" gives 60 + 20 = 80.
        assert_eq!(plan_eviction(&entries, 90, 100, 20), vec!["old"]);
        // 90 + 50 > 100; 60 + 50 = 110 > 90, 30 + 50 = 80: two go, oldest first.
        assert_eq!(plan_eviction(&entries, 90, 100, 50), vec!["old", "mid"]);
        assert_eq!(low_water(100), 90);
        assert_eq!(low_water(0), 0);
    }

    #[test]
    fn plan_for_large_incoming_aims_at_max_and_refuses_the_impossible() {
        let entries = [("a", 10, 1), ("b", 10, 2), ("c", 5, 3)];
        // 91 is above the low-water mark (90): aim at max instead. 25 + 91 = 116; without a
        // 106; without b 96, which fits, so c stays although 5 + 91 > 90.
        assert_eq!(plan_eviction(&entries, 25, 100, 91), vec!["a", "b"]);
        // Larger than the store: nothing can help, nothing is evicted.
        assert!(plan_eviction(&entries, 25, 100, 101).is_empty());
        // Over the limit with nothing incoming (a shrunk limit at open): 25 > 20, down to 18.
        assert_eq!(plan_eviction(&entries, 25, 20, 0), vec!["a"]);
        assert_eq!(plan_eviction(&entries, 25, 10, 0), vec!["a", "b"]);
    }

    #[test]
    fn plan_ties_keep_slice_order() {
        let entries = [("x", 10, 7), ("y", 10, 7), ("z", 10, 7)];
        assert_eq!(plan_eviction(&entries, 30, 30, 10), vec!["x", "y"]);
    }
}
