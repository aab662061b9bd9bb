//! Which examples a minibatch holds.
//!
//! The order of an epoch depends only on (n, seed, epoch, offset, rank,
//! world_size), so every replica and every restart computes the same
//! minibatches, and a client that fails over can resume on another server
//! from the next index.
//!
//! Exactly (README "Order"):
//! 1. Permutation. Unshuffled: 0, 1, ..., n-1. Shuffled: start from that
//!    list; SplitMix64 with initial state `seed XOR (epoch * 0x9E3779B97F4A7C15
//!    mod 2^64)`; for i = n-1 down to 1: j = (next() * (i+1)) >> 64 (a 128-bit
//!    product), swap positions i and j.
//! 2. Offset. The first `offset` positions of the permutation (consumed
//!    before, by all ranks together) are left out: the remainder is
//!    positions [offset, n). offset > n is an error; offset 0 is the whole
//!    permutation.
//! 3. Shards. With world_size w > 1 the remainder is cut to
//!    floor((n-offset)/w)*w entries and rank r takes remainder positions r,
//!    r+w, r+2w, ... (disjoint shards of equal length, as PyTorch's
//!    DistributedSampler with drop_last=True). The check w <= n is on n.
//! 4. Minibatches. Minibatch i of size s is shard positions [i*s, min((i+1)*s,
//!    len)); the last, partial one is dropped when drop_last is set.
//!
//! Elastic resume: once every rank of a world of w has consumed k whole
//! minibatches of s, the consumed positions are exactly [offset,
//! offset+k*s*w), so a restart with any world size w' passes offset + k*s*w
//! and gets every position not yet delivered once, except at most w'-1 at
//! the end of the remainder (the shard truncation).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
/// The permutation lives with the wire contract, so the server, the Rust
/// clients and the Python client's native transport share one.
pub use tensor_chunks::order::{permutation, SplitMix64};

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
    #[error("offset {offset} is past the end of the order: the set has {n} examples, so offset must be at most {n}")]
    OffsetPastEnd { offset: u64, n: usize },
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
    /// Positions of the epoch's order consumed before (all ranks together):
    /// the order is cut to [offset, n) before sharding.
    pub offset: u64,
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
    offset: usize,
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
        if spec.offset > n as u64 {
            return Err(OrderError::OffsetPastEnd {
                offset: spec.offset,
                n,
            });
        }
        let offset = spec.offset as usize;
        let world = world as usize;
        let rest = n - offset;
        let shard_len = if world > 1 { rest / world } else { rest };
        let batches = if spec.drop_last {
            shard_len / size
        } else {
            shard_len.div_ceil(size)
        } as u64;
        let perm = spec.shuffle.then(|| perms.get(n, spec.seed, spec.epoch));
        Ok(Plan {
            perm,
            offset,
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
        let pos = |k: usize| self.offset + self.rank + k * self.world;
        Ok(match (&self.perm, self.world) {
            (None, 1) => Selection::Range(self.offset + a, self.offset + b),
            (None, _) => Selection::Indices((a..b).map(pos).collect()),
            (Some(p), _) => Selection::Indices((a..b).map(|k| p[pos(k)] as usize).collect()),
        })
    }
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
                offset: 0,
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

    /// Every minibatch of a plan, as example indices.
    fn minibatches(p: &Plan) -> Vec<Vec<usize>> {
        (0..p.batches())
            .map(|i| {
                let b = p.batch(i).unwrap();
                assert_eq!(b.len(), p.batch_len(i));
                b.indices()
            })
            .collect()
    }

    /// The rule before `offset` existed, written out plainly: offset 0 must
    /// give exactly this.
    fn rule_without_offset(n: usize, size: usize, spec: &OrderSpec) -> Vec<Vec<usize>> {
        let base: Vec<usize> = if spec.shuffle {
            permutation(n, spec.seed, spec.epoch)
                .into_iter()
                .map(|i| i as usize)
                .collect()
        } else {
            (0..n).collect()
        };
        let w = spec.world_size.max(1) as usize;
        let shard: Vec<usize> = if w > 1 {
            base[..n / w * w]
                .iter()
                .skip(spec.rank as usize)
                .step_by(w)
                .copied()
                .collect()
        } else {
            base
        };
        let mut out: Vec<Vec<usize>> = shard.chunks(size).map(<[usize]>::to_vec).collect();
        if spec.drop_last && out.last().is_some_and(|b| b.len() < size) {
            out.pop();
        }
        out
    }

    #[test]
    fn offset_cuts_the_order_before_sharding() {
        // Reference vectors of the documented rule (README "Order"), pinned
        // as literals here and in tests/python/test_client.py.
        // permutation(10, 7, 1) = [6, 4, 5, 7, 2, 0, 1, 3, 8, 9]; offset 3
        // leaves [7, 2, 0, 1, 3, 8, 9], cut to 6 for 2 ranks (9 left out).
        assert_eq!(permutation(10, 7, 1), [6, 4, 5, 7, 2, 0, 1, 3, 8, 9]);
        let spec = |rank| OrderSpec {
            shuffle: true,
            seed: 7,
            epoch: 1,
            rank,
            world_size: 2,
            drop_last: false,
            offset: 3,
        };
        assert_eq!(minibatches(&plan(10, 2, spec(0))), [vec![7, 0], vec![3]]);
        assert_eq!(minibatches(&plan(10, 2, spec(1))), [vec![2, 1], vec![8]]);
        let dl = |rank| OrderSpec {
            drop_last: true,
            ..spec(rank)
        };
        assert_eq!(minibatches(&plan(10, 2, dl(1))), [vec![2, 1]]);
        // Unshuffled: positions are examples; unsharded stays a zero-copy range.
        let un = |rank, world_size| OrderSpec {
            rank,
            world_size,
            offset: 3,
            ..Default::default()
        };
        assert_eq!(minibatches(&plan(10, 2, un(0, 2))), [vec![3, 5], vec![7]]);
        assert_eq!(minibatches(&plan(10, 2, un(1, 2))), [vec![4, 6], vec![8]]);
        let p = plan(10, 4, un(0, 0));
        assert_eq!(p.batches(), 2);
        assert_eq!(p.batch(0).unwrap(), Selection::Range(3, 7));
        assert_eq!(p.batch(1).unwrap(), Selection::Range(7, 10));
        // Shuffled, unsharded: the permutation's tail.
        let p = plan(
            10,
            4,
            OrderSpec {
                world_size: 1,
                rank: 0,
                ..spec(0)
            },
        );
        assert_eq!(minibatches(&p), [vec![7, 2, 0, 1], vec![3, 8, 9]]);
    }

    #[test]
    fn offset_at_and_past_the_end() {
        let c = PermCache::default();
        let at = |offset, world_size, rank| OrderSpec {
            shuffle: true,
            offset,
            world_size,
            rank,
            ..Default::default()
        };
        // The epoch is finished: an empty order, not an error.
        let p = Plan::new(10, 3, 5, &at(10, 0, 0), &c).unwrap();
        assert_eq!((p.batches(), p.shard_len()), (0, 0));
        assert!(matches!(p.batch(0), Err(OrderError::PastEnd { .. })));
        // A remainder shorter than the world: empty shards, not an error.
        let p = Plan::new(10, 3, 5, &at(8, 3, 2), &c).unwrap();
        assert_eq!((p.batches(), p.shard_len()), (0, 0));
        // The world-size check stays on n, not on the remainder.
        assert_eq!(
            Plan::new(10, 3, 5, &at(5, 11, 0), &c).unwrap_err(),
            OrderError::WorldTooLarge { world: 11, n: 10 }
        );
        let e = Plan::new(10, 3, 5, &at(11, 0, 0), &c).unwrap_err();
        assert_eq!(e, OrderError::OffsetPastEnd { offset: 11, n: 10 });
        let msg = e.to_string();
        assert!(
            msg.contains("offset 11") && msg.contains("10 examples"),
            "{msg}"
        );
        assert!(Plan::new(10, 3, 5, &at(u64::MAX, 2, 1), &c).is_err());
    }

    #[test]
    fn offset_zero_is_the_rule_without_offset() {
        let mut rng = SplitMix64(0x0FF5E7);
        let cache = PermCache::default();
        for _ in 0..3000 {
            let mut pick = |k: usize| (rng.next_u64() % k as u64) as usize;
            let n = 1 + pick(120);
            let world = pick(n.min(9) + 1) as u32; // 0 and 1: unsharded
            let spec = OrderSpec {
                shuffle: pick(2) == 1,
                seed: pick(5) as u64,
                epoch: pick(4) as u64,
                rank: pick(world.max(1) as usize) as u32,
                world_size: world,
                drop_last: pick(2) == 1,
                offset: 0,
            };
            let size = 1 + pick(n + 3);
            let p = Plan::new(n, size, 1 << 20, &spec, &cache).unwrap();
            assert_eq!(
                minibatches(&p),
                rule_without_offset(n, size, &spec),
                "{n} {size} {spec:?}"
            );
            if !spec.shuffle && world <= 1 {
                assert!(!p.gathers());
                for i in 0..p.batches() {
                    assert!(matches!(p.batch(i).unwrap(), Selection::Range(..)));
                }
            }
        }
    }

    /// Elastic resume: a world of w consumes k whole minibatches of s per
    /// rank from `offset`, then a world of w' resumes at offset + k*s*w.
    /// Over the epoch every position of the order is delivered exactly once,
    /// except at most w'-1 left out at its end.
    #[test]
    fn elastic_resume_delivers_every_position_once() {
        let mut rng = SplitMix64(0xE1A5);
        let cache = PermCache::default();
        for case in 0..4000u32 {
            let mut pick = |k: usize| (rng.next_u64() % k as u64) as usize;
            let n = 1 + pick(if case.is_multiple_of(4) { 300 } else { 40 });
            let shuffle = pick(2) == 1;
            let (w, w2) = (1 + pick(n.min(8)), 1 + pick(n.min(8)));
            let (s, s2) = (1 + pick(6), 1 + pick(6));
            let offset = pick(n + 1);
            let spec = |rank: usize, world: usize, offset: usize| OrderSpec {
                shuffle,
                seed: 5,
                epoch: 2,
                rank: rank as u32,
                world_size: world as u32,
                // drop_last leaves whole minibatches as they are.
                drop_last: case.is_multiple_of(3),
                offset: offset as u64,
            };
            let order: Vec<usize> = if shuffle {
                permutation(n, 5, 2)
                    .into_iter()
                    .map(|i| i as usize)
                    .collect()
            } else {
                (0..n).collect()
            };
            // The first world: k whole minibatches on every rank.
            let full = (n - offset) / w / s;
            let k = pick(full + 1);
            let mut first = Vec::new();
            for rank in 0..w {
                let p = Plan::new(n, s, 1 << 20, &spec(rank, w, offset), &cache).unwrap();
                for i in 0..k as u64 {
                    assert_eq!(p.batch_len(i), s);
                    first.extend(p.batch(i).unwrap().indices());
                }
            }
            let resumed = offset + k * s * w;
            first.sort_unstable();
            let mut prefix = order[offset..resumed].to_vec();
            prefix.sort_unstable();
            assert_eq!(first, prefix, "the consumed positions are a prefix");
            // The second world, to the end of the epoch.
            let mut seen = vec![0u32; n];
            for &i in &order[..resumed] {
                seen[i] += 1;
            }
            for rank in 0..w2 {
                let sp = OrderSpec {
                    drop_last: false,
                    ..spec(rank, w2, resumed)
                };
                let p = Plan::new(n, s2, 1 << 20, &sp, &cache).unwrap();
                for b in minibatches(&p) {
                    for i in b {
                        seen[i] += 1;
                    }
                }
            }
            let left_out = (n - resumed) % w2;
            assert!(left_out < w2);
            let want: Vec<u32> = (0..n).map(|pos| u32::from(pos < n - left_out)).collect();
            let got: Vec<u32> = order.iter().map(|&i| seen[i]).collect();
            assert_eq!(got, want, "n {n} w {w} s {s} offset {offset} k {k} w' {w2}");
        }
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
