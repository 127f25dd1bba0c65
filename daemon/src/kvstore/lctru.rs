//! LCTRU: least-compression-tolerable-and-recently-used eviction order.
//!
//! One LRU queue per precision. The victim is the least recently used entry of the queue with
//! the most bits: those chunks free the most memory each and, having been given many bits,
//! were judged the least tolerant of compression, so keeping the compressed ones resident
//! serves more contexts from memory (LLMS §4.3). With a single precision this is plain LRU.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// Eviction queues over keys `K`, each entry filed under a level (its bits; higher first).
#[derive(Debug)]
pub struct Lctru<K> {
    /// level bits → (last use, key), oldest first.
    queues: std::collections::BTreeMap<u32, BTreeSet<(u64, K)>>,
    entries: HashMap<K, (u32, u64)>,
    clock: u64,
}

impl<K: Copy + Ord + Hash> Default for Lctru<K> {
    fn default() -> Self {
        Lctru {
            queues: Default::default(),
            entries: HashMap::new(),
            clock: 0,
        }
    }
}

impl<K: Copy + Ord + Hash> Lctru<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Files `key` under `bits` as used now (moving it if it was filed elsewhere).
    pub fn touch(&mut self, key: K, bits: u32) {
        self.remove(key);
        self.clock += 1;
        self.queues
            .entry(bits)
            .or_default()
            .insert((self.clock, key));
        self.entries.insert(key, (bits, self.clock));
    }

    /// Re-files `key` under new bits, keeping its last use (recompression is not a use).
    pub fn relevel(&mut self, key: K, bits: u32) {
        if let Some((old, tick)) = self.entries.get(&key).copied() {
            if old == bits {
                return;
            }
            if let Some(q) = self.queues.get_mut(&old) {
                q.remove(&(tick, key));
                if q.is_empty() {
                    self.queues.remove(&old);
                }
            }
            self.queues.entry(bits).or_default().insert((tick, key));
            self.entries.insert(key, (bits, tick));
        }
    }

    /// Takes `key` out of the queues (it is evicted, pinned or gone).
    pub fn remove(&mut self, key: K) -> bool {
        match self.entries.remove(&key) {
            Some((bits, tick)) => {
                if let Some(q) = self.queues.get_mut(&bits) {
                    q.remove(&(tick, key));
                    if q.is_empty() {
                        self.queues.remove(&bits);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// The next victim (most bits first, least recently used within), without removing it.
    pub fn peek_victim(&self) -> Option<K> {
        self.queues
            .iter()
            .next_back()
            .and_then(|(_, q)| q.iter().next())
            .map(|&(_, k)| k)
    }

    /// Removes and returns the first key in eviction order that `ok` accepts.
    pub fn pop_victim_where(&mut self, mut ok: impl FnMut(K) -> bool) -> Option<K> {
        let k = self
            .queues
            .iter()
            .rev()
            .flat_map(|(_, q)| q.iter().map(|&(_, k)| k))
            .find(|&k| ok(k))?;
        self.remove(k);
        Some(k)
    }

    /// Removes and returns the next victim.
    pub fn pop_victim(&mut self) -> Option<K> {
        let k = self.peek_victim()?;
        self.remove(k);
        Some(k)
    }

    pub fn contains(&self, key: K) -> bool {
        self.entries.contains_key(&key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_bits_first_then_least_recent() {
        let mut q = Lctru::new();
        q.touch(1u32, 4);
        q.touch(2, 8);
        q.touch(3, 8);
        q.touch(4, 2);
        q.touch(2, 8); // 2 is now more recent than 3
        assert_eq!(q.pop_victim(), Some(3));
        assert_eq!(q.pop_victim(), Some(2));
        assert_eq!(q.pop_victim(), Some(1));
        assert_eq!(q.pop_victim(), Some(4));
        assert_eq!(q.pop_victim(), None);
    }

    #[test]
    fn relevel_keeps_recency_and_remove_forgets() {
        let mut q = Lctru::new();
        q.touch(1u32, 8);
        q.touch(2, 8);
        q.relevel(1, 2);
        q.relevel(2, 2);
        assert_eq!(q.peek_victim(), Some(1));
        assert!(q.remove(1));
        assert!(!q.remove(1));
        assert!(!q.contains(1));
        assert_eq!(q.len(), 1);
        q.relevel(7, 4); // unknown keys are ignored
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn conditional_victim_follows_the_same_order() {
        let mut q = Lctru::new();
        q.touch(1u32, 4);
        q.touch(2, 8);
        q.touch(3, 8);
        assert_eq!(q.pop_victim_where(|k| k != 2), Some(3));
        assert_eq!(q.pop_victim_where(|k| k == 1), Some(1));
        assert_eq!(q.pop_victim_where(|_| false), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn single_level_is_plain_lru() {
        let mut q = Lctru::new();
        for k in 0..10u32 {
            q.touch(k, 16);
        }
        q.touch(0, 16);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_victim()).collect();
        assert_eq!(order, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0]);
    }
}
