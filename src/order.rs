//! Which examples a minibatch holds.
//!
//! The order of an epoch depends only on (n, seed, epoch, rank, world_size),
//! so every replica and every restart computes the same minibatches, and a
//! client that fails over can resume on another server from the next index.
//!
//! Exactly (README "Order"):
//! 1. Permutation. Unshuffled: 0, 1, ..., n-1. Shuffled: start from that
//!    list; SplitMix64 with initial state `seed XOR (epoch * 0x9E3779B97F4A7C15
//!    mod 2^64)`; for i = n-1 down to 1: j = (next() * (i+1)) >> 64 (a 128-bit
//!    product), swap positions i and j.
//! 2. Shards. With world_size w > 1 the permutation is cut to floor(n/w)*w
//!    entries and rank r takes positions r, r+w, r+2w, ... (disjoint shards of
//!    equal length, as PyTorch's DistributedSampler with drop_last=True).
//! 3. Minibatches. Minibatch i of size s is shard positions [i*s, min((i+1)*s,
//!    len)); the last, partial one is dropped when drop_last is set.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Errors in an ordering request; the service maps each to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("size must be at least 1")]
    ZeroSize,
    #[error("size {size} exceeds the server's max batch size {max}")]
    TooLarge { size: usize, max: usize },
    #[error("rank {rank} is not below world_size {world}")]
    BadRank { rank: u32, world: u32 },
    #[error("world_size {world} exceeds the {n} examples of the set: some shards would be empty")]
    WorldTooLarge { world: u32, n: usize },
    #[error("minibatch {index} is past the end: this order has {batches} minibatches of size {size} (indices 0..{batches})")]
    PastEnd {
        index: u64,
        batches: u64,
        size: usize,
    },
}

/// How the caller wants the epoch ordered (the proto's `Order`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OrderSpec {
    pub shuffle: bool,
    pub seed: u64,
    pub epoch: u64,
    pub rank: u32,
    pub world_size: u32,
    pub drop_last: bool,
}

/// The examples of one minibatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Contiguous examples [start, end): served as a zero-copy slice.
    Range(usize, usize),
    /// Scattered examples, gathered into the outgoing buffer.
    Indices(Vec<usize>),
}

impl Selection {
    pub fn len(&self) -> usize {
        match self {
            Selection::Range(a, b) => b - a,
            Selection::Indices(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k`-th example.
    pub fn get(&self, k: usize) -> usize {
        match self {
            Selection::Range(a, _) => a + k,
            Selection::Indices(v) => v[k],
        }
    }

    /// The example indices, in order.
    pub fn indices(&self) -> Vec<usize> {
        match self {
            Selection::Range(a, b) => (*a..*b).collect(),
            Selection::Indices(v) => v.clone(),
        }
    }
}

/// A resolved order for one (set, size, spec).
#[derive(Debug, Clone)]
pub struct Plan {
    perm: Option<Arc<Vec<u32>>>,
    rank: usize,
    world: usize,
    shard_len: usize,
    size: usize,
    batches: u64,
}

impl Plan {
    /// Resolves the order; `perms` caches shuffles across requests.
    pub fn new(
        n: usize,
        size: usize,
        max: usize,
        spec: &OrderSpec,
        perms: &PermCache,
    ) -> Result<Plan, OrderError> {
        if size == 0 {
            return Err(OrderError::ZeroSize);
        }
        if size > max {
            return Err(OrderError::TooLarge { size, max });
        }
        let world = spec.world_size.max(1);
        if spec.rank >= world {
            return Err(OrderError::BadRank {
                rank: spec.rank,
                world,
            });
        }
        if world as usize > n.max(1) {
            return Err(OrderError::WorldTooLarge { world, n });
        }
        let world = world as usize;
        let shard_len = if world > 1 { n / world } else { n };
        let batches = if spec.drop_last {
            shard_len / size
        } else {
            shard_len.div_ceil(size)
        } as u64;
        let perm = spec.shuffle.then(|| perms.get(n, spec.seed, spec.epoch));
        Ok(Plan {
            perm,
            rank: spec.rank as usize,
            world,
            shard_len,
            size,
            batches,
        })
    }

    /// Minibatches in this order.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Examples in this rank's shard.
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Whether minibatches are scattered examples (shuffled or sharded),
    /// so that a [`Selection::Indices`] list is built for each.
    pub fn gathers(&self) -> bool {
        self.perm.is_some() || self.world > 1
    }

    /// Examples in minibatch `index` (0 past the end), without building
    /// its selection.
    pub fn batch_len(&self, index: u64) -> usize {
        if index >= self.batches {
            return 0;
        }
        let a = index as usize * self.size;
        self.size.min(self.shard_len - a)
    }

    /// The examples of minibatch `index`.
    pub fn batch(&self, index: u64) -> Result<Selection, OrderError> {
        if index >= self.batches {
            return Err(OrderError::PastEnd {
                index,
                batches: self.batches,
                size: self.size,
            });
        }
        let a = index as usize * self.size;
        let b = (a + self.size).min(self.shard_len);
        let pos = |k: usize| self.rank + k * self.world;
        Ok(match (&self.perm, self.world) {
            (None, 1) => Selection::Range(a, b),
            (None, _) => Selection::Indices((a..b).map(pos).collect()),
            (Some(p), _) => Selection::Indices((a..b).map(|k| p[pos(k)] as usize).collect()),
        })
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014), the generator of the documented order.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The documented permutation of 0..n for (seed, epoch).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(n <= u32::MAX as usize, "sets are limited to 2^32 examples");
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

/// (examples, seed, epoch)
type PermKey = (usize, u64, u64);

/// Recently used permutations. Trainers fetch the same epoch's order many
/// times (once per minibatch with GetBatch), and a 50,000-entry shuffle costs
/// more than serving a small minibatch.
#[derive(Debug, Default)]
pub struct PermCache {
    entries: Mutex<VecDeque<(PermKey, Arc<Vec<u32>>)>>,
}

/// Permutations kept. Each is 4 bytes per example (200 KB for MNIST's
/// train set), so this bounds the cache near 13 MB at that size.
pub const PERM_CACHE_ENTRIES: usize = 64;

impl PermCache {
    pub fn get(&self, n: usize, seed: u64, epoch: u64) -> Arc<Vec<u32>> {
        let key = (n, seed, epoch);
        {
            let mut e = self.entries.lock().unwrap();
            if let Some(i) = e.iter().position(|(k, _)| *k == key) {
                let hit = e.remove(i).unwrap();
                let p = hit.1.clone();
                e.push_front(hit);
                return p;
            }
        }
        let p = Arc::new(permutation(n, seed, epoch));
        let mut e = self.entries.lock().unwrap();
        e.push_front((key, p.clone()));
        e.truncate(PERM_CACHE_ENTRIES);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: usize, size: usize, spec: OrderSpec) -> Plan {
        Plan::new(n, size, 1 << 20, &spec, &PermCache::default()).unwrap()
    }

    #[test]
    fn tutorial_minibatches() {
        let p = plan(1005, 500, OrderSpec::default());
        assert_eq!(p.batches(), 3);
        assert_eq!(p.batch(2).unwrap(), Selection::Range(1000, 1005));
        assert!(matches!(p.batch(3), Err(OrderError::PastEnd { .. })));
        let p = plan(
            1005,
            500,
            OrderSpec {
                drop_last: true,
                ..Default::default()
            },
        );
        assert_eq!(p.batches(), 2);
    }

    #[test]
    fn permutation_is_a_known_deterministic_shuffle() {
        let a = permutation(10, 42, 0);
        assert_eq!(a, permutation(10, 42, 0));
        assert_ne!(a, permutation(10, 42, 1));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        // Reference values of the documented rule (README "Order"), pinned
        // as literals here and in tests/python/test_client.py.
        assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(a, [8, 3, 6, 5, 4, 0, 9, 2, 1, 7]);
        assert_eq!(
            permutation(12, 7, 3),
            [9, 10, 5, 11, 3, 2, 7, 0, 4, 8, 6, 1]
        );
    }

    #[test]
    fn shards_are_disjoint_equal_and_cover_floor() {
        let n = 103;
        let mut all = Vec::new();
        for rank in 0..4 {
            let spec = OrderSpec {
                shuffle: true,
                seed: 7,
                epoch: 3,
                rank,
                world_size: 4,
                drop_last: false,
            };
            let p = plan(n, 10, spec);
            assert_eq!(p.shard_len(), 25);
            for i in 0..p.batches() {
                all.extend(p.batch(i).unwrap().indices());
            }
        }
        assert_eq!(all.len(), 100);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn bad_requests() {
        let c = PermCache::default();
        let s = OrderSpec {
            rank: 2,
            world_size: 2,
            ..Default::default()
        };
        assert_eq!(
            Plan::new(10, 1, 5, &s, &c).unwrap_err(),
            OrderError::BadRank { rank: 2, world: 2 }
        );
        assert_eq!(
            Plan::new(10, 0, 5, &OrderSpec::default(), &c).unwrap_err(),
            OrderError::ZeroSize
        );
        assert!(matches!(
            Plan::new(10, 6, 5, &OrderSpec::default(), &c),
            Err(OrderError::TooLarge { .. })
        ));
    }
}
