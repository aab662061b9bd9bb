//! The shuffled order of README "Order" (step 1): the permutation of 0..n
//! for (seed, epoch). One implementation for the server (`minibatchd::order`
//! shards and cuts it), the Rust clients and the Python client's native
//! transport (which hands it to `minibatch_client.order`, whose pure-Python
//! version is the fallback and the readable specification).
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_permutation() {
        // Pinned in src/order.rs and tests/python/test_client.py too.
        assert_eq!(super::permutation(10, 7, 1), [6, 4, 5, 7, 2, 0, 1, 3, 8, 9]);
        assert_eq!(super::permutation(1, 7, 1), [0]);
        assert!(super::permutation(0, 7, 1).is_empty());
    }
}
