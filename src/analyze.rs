//! Facts about each tensor that need a full pass over its bytes: sha256,
//! value range, label histogram, and which narrower wire dtypes reproduce the
//! values exactly. `inspect` prints them; the server computes them once in the
//! background after it starts answering (so start-up never waits on hashing)
//! and uses them to grant or refuse wire conversions.
use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{DType, Dataset, Tensor};

/// Labels with more distinct values than this get no histogram (they are
/// probably not class labels).
pub const MAX_CLASSES: usize = 65_536;

/// Divisors tried for the lossless uint8 wire form, best first.
pub const UINT8_DIVISORS: [u32; 2] = [256, 255];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorStats {
    pub sha256: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Float values that are all k/256, k in 0..=255 (float32(k)/256 == v).
    pub multiple_of_1_256: bool,
    /// Likewise for k/255.
    pub multiple_of_1_255: bool,
    /// The `scale_divisor` a uint8 wire form of this tensor carries: d such
    /// that every value is float32(byte)/d for a byte (256 preferred), or
    /// the stored pixel divisor of uint8 data. (Named for the uint8 form in
    /// `inspect --json`, which reports it.)
    pub uint8_divisor: Option<u32>,
    pub float16_exact: bool,
    pub bfloat16_exact: bool,
    pub float32_exact: bool,
    pub int32_exact: bool,
    /// Label value → count, for integer tensors with few distinct values.
    pub histogram: Option<BTreeMap<i64, u64>>,
}

/// sha256 of the bytes, hex.
pub fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Computes every fact about one tensor. Hashing and the value scan run on
/// two threads: together they are memory-bound, apart each is compute-bound.
pub fn tensor_stats(t: &Tensor) -> TensorStats {
    std::thread::scope(|s| {
        let h = s.spawn(|| sha256_hex(&t.data));
        let mut st = scan(t);
        st.sha256 = h.join().expect("hash thread panicked");
        st
    })
}

/// Scan results for one piece of a tensor; pieces merge into [`TensorStats`].
#[derive(Debug, Clone)]
struct Part {
    lo: f64,
    hi: f64,
    any: bool,
    m256: bool,
    m255: bool,
    f16: bool,
    bf16: bool,
    f32: bool,
    i32: bool,
    hist: Option<BTreeMap<i64, u64>>,
}

impl Part {
    fn empty() -> Self {
        Part {
            lo: f64::INFINITY,
            hi: f64::NEG_INFINITY,
            any: false,
            m256: true,
            m255: true,
            f16: true,
            bf16: true,
            f32: true,
            i32: true,
            hist: Some(BTreeMap::new()),
        }
    }

    fn merge(mut self, o: Part) -> Part {
        self.lo = self.lo.min(o.lo);
        self.hi = self.hi.max(o.hi);
        self.any |= o.any;
        self.m256 &= o.m256;
        self.m255 &= o.m255;
        self.f16 &= o.f16;
        self.bf16 &= o.bf16;
        self.f32 &= o.f32;
        self.i32 &= o.i32;
        self.hist = match (self.hist, o.hist) {
            (Some(mut a), Some(b)) => {
                for (k, v) in b {
                    *a.entry(k).or_default() += v;
                }
                (a.len() <= MAX_CLASSES).then_some(a)
            }
            _ => None,
        };
        self
    }
}

/// Bytes per scan job: small enough to share a big tensor between cores,
/// large enough that merging is free.
const SCAN_PIECE: usize = 8 << 20;

/// Scans `b` (whole elements of `d`).
fn scan_part(d: DType, b: &[u8]) -> Part {
    let mut p = Part::empty();
    p.any = !b.is_empty();
    match d {
        DType::F32 => {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            let (mut m256, mut f16, mut bf16) = (true, true, true);
            for c in b.chunks_exact(4) {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                lo = lo.min(v);
                hi = hi.max(v);
                // Non-short-circuit `&` keeps the loop branch-free.
                m256 &= is_multiple_of_256th(v.to_bits());
                bf16 &= (v.to_bits() & 0xffff == 0) & !v.is_nan();
                f16 &= f16_exact(v);
            }
            (p.lo, p.hi) = (lo as f64, hi as f64);
            // A separate pass that stops at the first miss: k/256 data (MNIST)
            // fails it at its first non-zero pixel.
            let m255 = b
                .chunks_exact(4)
                .all(|c| is_multiple(f32::from_le_bytes(c.try_into().unwrap()), 255.0));
            (p.m256, p.m255, p.f16, p.bf16) = (m256, m255, f16, bf16);
            p.i32 = false;
            p.hist = None;
        }
        DType::F64 => {
            for c in b.chunks_exact(8) {
                let v = f64::from_le_bytes(c.try_into().unwrap());
                p.lo = p.lo.min(v);
                p.hi = p.hi.max(v);
                p.f32 &= (v as f32) as f64 == v;
            }
            (p.m256, p.m255, p.f16, p.bf16, p.i32, p.hist) =
                (false, false, false, false, false, None);
        }
        d if d.is_integer() || d == DType::Bool => {
            let mut hist: BTreeMap<i64, u64> = BTreeMap::new();
            let mut too_many = false;
            let (mut lo, mut hi) = (i128::MAX, i128::MIN);
            for c in b.chunks_exact(d.size()) {
                let v = int_value(d, c);
                lo = lo.min(v);
                hi = hi.max(v);
                if !too_many {
                    if let Ok(k) = i64::try_from(v) {
                        *hist.entry(k).or_default() += 1;
                    }
                    too_many = hist.len() > MAX_CLASSES;
                }
            }
            if p.any {
                (p.lo, p.hi) = (lo as f64, hi as f64);
            }
            p.i32 = lo >= i32::MIN as i128 && hi <= i32::MAX as i128;
            p.hist = (!too_many).then_some(hist);
            (p.m256, p.m255, p.f16, p.bf16, p.f32) = (false, false, false, false, false);
        }
        _ => {
            (p.m256, p.m255, p.f16, p.bf16, p.f32, p.i32, p.hist) =
                (false, false, false, false, false, false, None);
        }
    }
    p
}

/// Turns a merged scan into stats (without the hash).
fn finish(t: &Tensor, p: Part) -> TensorStats {
    let any = p.any;
    let float = t.dtype == DType::F32;
    let m256 = any && float && p.m256;
    let m255 = any && float && p.m255;
    TensorStats {
        sha256: String::new(),
        min: any.then_some(p.lo),
        max: any.then_some(p.hi),
        multiple_of_1_256: m256,
        multiple_of_1_255: m255,
        uint8_divisor: if m256 {
            Some(256)
        } else if m255 {
            Some(255)
        } else if t.dtype == DType::U8 {
            t.scale_divisor
        } else {
            None
        },
        float16_exact: any && float && p.f16,
        bfloat16_exact: any && float && p.bf16,
        float32_exact: match t.dtype {
            DType::F32 => true,
            DType::F64 => any && p.f32,
            DType::U8 => t.scale_divisor.is_some(),
            _ => false,
        },
        int32_exact: any && t.dtype.is_integer() && p.i32,
        histogram: if any { p.hist } else { None },
    }
}

fn scan(t: &Tensor) -> TensorStats {
    finish(t, scan_part(t.dtype, &t.data))
}

/// The float32 with these bits is k/256 for an integer k in 0..=255: zero,
/// or positive with exponent -8..=-1 and no fraction bits below 2^-8. All
/// integer operations, so the scan of a big tensor stays cheap.
fn is_multiple_of_256th(bits: u32) -> bool {
    let exp = (bits >> 23) as i32 - 127; // includes the sign bit: negatives fail
    let low = 23 - (exp + 8); // fraction bits that must be zero
    bits == 0 || ((-8..=-1).contains(&exp) && bits & ((1u32 << low.clamp(0, 31)) - 1) == 0)
}

/// v == float32(k) / d for some integer k in 0..=255.
fn is_multiple(v: f32, d: f32) -> bool {
    // Truncation is floor here: negative inputs fail the range check anyway
    // (and `as` saturates, mapping NaN to 0, which then fails `== v`).
    let k = (v * d + 0.5) as i32;
    (0..=255).contains(&k) & ((k as f32) / d == v)
}

/// v converts to float16 and back unchanged (checked on the bits, since a
/// software f16 conversion per value is several times slower).
fn f16_exact(v: f32) -> bool {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127;
    let sig = (bits & 0x7f_ffff) | 0x80_0000;
    match exp {
        -127 => bits & 0x7fff_ffff == 0, // zero (f32 subnormals underflow f16)
        128 => bits & 0x7f_ffff == 0,    // infinity yes, NaN no
        -14..=15 => bits & 0x1fff == 0,  // f16 normal: 10 mantissa bits
        -24..=-15 => sig.trailing_zeros() as i32 >= -1 - exp, // f16 subnormal: multiples of 2^-24
        _ => false,
    }
}

fn int_value(d: DType, c: &[u8]) -> i128 {
    match d {
        DType::U8 | DType::Bool => c[0] as i128,
        DType::I8 => c[0] as i8 as i128,
        DType::I16 => i16::from_le_bytes([c[0], c[1]]) as i128,
        DType::U16 => u16::from_le_bytes([c[0], c[1]]) as i128,
        DType::I32 => i32::from_le_bytes(c.try_into().unwrap()) as i128,
        DType::U32 => u32::from_le_bytes(c.try_into().unwrap()) as i128,
        DType::I64 => i64::from_le_bytes(c.try_into().unwrap()) as i128,
        DType::U64 => u64::from_le_bytes(c.try_into().unwrap()) as i128,
        _ => 0,
    }
}

/// Stats for every tensor, in set order, x before y.
#[derive(Debug, Clone)]
pub struct DatasetStats {
    /// (set, tensor name, stats)
    pub tensors: Vec<(String, &'static str, TensorStats)>,
    pub fingerprint: String,
}

impl DatasetStats {
    pub fn get(&self, set: &str, name: &str) -> Option<&TensorStats> {
        self.tensors
            .iter()
            .find(|(s, n, _)| s == set && *n == name)
            .map(|(_, _, t)| t)
    }
}

/// Computes stats for the whole dataset and its fingerprint: sha256 over the
/// lines `"<set> <tensor> <dtype> <d0,d1,..> <sha256>\n"`, in set order,
/// x before y.
///
/// The work (one hash and one scan per tensor) runs on every core, largest
/// job first: hashing MNIST's train x alone is most of the total.
pub fn dataset_stats(ds: &Dataset) -> DatasetStats {
    let tensors: Vec<(&str, &'static str, &Tensor)> = ds
        .sets
        .iter()
        .flat_map(|s| [(s.name.as_str(), "x", &s.x), (s.name.as_str(), "y", &s.y)])
        .collect();
    // Jobs: hash a whole tensor (sequential by nature), or scan a piece of
    // one; largest first so the big hash starts at once.
    #[derive(Clone, Copy)]
    enum Job {
        Hash(usize),
        Scan(usize, usize, usize),
    }
    let mut jobs = Vec::new();
    for (i, (_, _, t)) in tensors.iter().enumerate() {
        jobs.push((t.data.len(), Job::Hash(i)));
        let step = SCAN_PIECE / t.dtype.size() * t.dtype.size();
        let mut a = 0;
        while a < t.data.len() || a == 0 {
            let b = (a + step).min(t.data.len());
            jobs.push((b - a, Job::Scan(i, a, b)));
            a = b;
            if a == 0 {
                break;
            }
        }
    }
    jobs.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
    let queue = std::sync::Mutex::new(jobs.into_iter().map(|(_, j)| j));
    let hashes = std::sync::Mutex::new(vec![String::new(); tensors.len()]);
    let parts = std::sync::Mutex::new(vec![Part::empty(); tensors.len()]);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().next() else {
                    break;
                };
                match job {
                    Job::Hash(i) => {
                        let h = sha256_hex(&tensors[i].2.data);
                        hashes.lock().unwrap()[i] = h;
                    }
                    Job::Scan(i, a, b) => {
                        let t = tensors[i].2;
                        let p = scan_part(t.dtype, &t.data[a..b]);
                        let mut all = parts.lock().unwrap();
                        let prev = std::mem::replace(&mut all[i], Part::empty());
                        all[i] = prev.merge(p);
                    }
                }
            });
        }
    });
    let hashes = hashes.into_inner().unwrap();
    let scans: Vec<TensorStats> = parts
        .into_inner()
        .unwrap()
        .into_iter()
        .zip(&tensors)
        .map(|(p, (_, _, t))| finish(t, p))
        .collect();
    let mut fp = Sha256::new();
    let mut out = Vec::new();
    for (i, ((set, name, t), st)) in tensors.iter().zip(scans).enumerate() {
        let mut st = st;
        st.sha256 = hashes[i].clone();
        // A histogram describes labels; over uint8 pixels (IDX, CIFAR) it
        // is 256 counts of noise in every report.
        if *name == "x" {
            st.histogram = None;
        }
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        fp.update(
            format!(
                "{set} {name} {} {} {}\n",
                t.dtype,
                shape.join(","),
                st.sha256
            )
            .as_bytes(),
        );
        out.push((set.to_string(), *name, st));
    }
    DatasetStats {
        tensors: out,
        fingerprint: hex(&fp.finalize()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f32_tensor(v: &[f32]) -> Tensor {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::new(DType::F32, vec![v.len()], Bytes::from(b)).unwrap()
    }

    #[test]
    fn finds_exact_uint8_scale() {
        let t = f32_tensor(&[0.0, 1.0 / 256.0, 255.0 / 256.0]);
        let s = tensor_stats(&t);
        assert!(s.multiple_of_1_256);
        assert_eq!(s.uint8_divisor, Some(256));
        assert!(s.float16_exact && s.bfloat16_exact);
        let t = f32_tensor(&[0.1]);
        let s = tensor_stats(&t);
        assert_eq!(s.uint8_divisor, None);
        assert!(!s.bfloat16_exact);
        let t = f32_tensor(&[1.0, 2.0 / 255.0]);
        assert_eq!(tensor_stats(&t).uint8_divisor, Some(255));
    }

    #[test]
    fn integer_256th_check_matches_the_float_one() {
        let mut x = 0x9e37_79b9u32;
        for k in 0..=256u32 {
            let v = k as f32 / 256.0;
            assert_eq!(is_multiple_of_256th(v.to_bits()), k < 256, "{k}");
        }
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x & 0xbfff_ff00);
            assert_eq!(
                is_multiple_of_256th(v.to_bits()),
                is_multiple(v, 256.0),
                "{v:e}"
            );
        }
    }

    #[test]
    fn f16_check_matches_a_real_conversion() {
        let mut x = 0x1234_5678u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Bias towards values with few mantissa bits so both answers occur.
            let v = f32::from_bits(x & 0xffff_e000);
            let want = half::f16::from_f32(v).to_f32() == v;
            assert_eq!(f16_exact(v), want, "{v:e} ({:#x})", v.to_bits());
        }
        for v in [
            0.0f32,
            -0.0,
            65504.0,
            65520.0,
            6.0e-8,
            5.9604645e-8,
            f32::INFINITY,
            1.0 / 3.0,
        ] {
            assert_eq!(f16_exact(v), half::f16::from_f32(v).to_f32() == v, "{v:e}");
        }
    }

    #[test]
    fn label_histogram() {
        let b: Vec<u8> = [3i64, 1, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = Tensor::new(DType::I64, vec![3], Bytes::from(b)).unwrap();
        let s = tensor_stats(&t);
        assert_eq!(s.histogram.unwrap(), BTreeMap::from([(1, 1), (3, 2)]));
        assert!(s.int32_exact);
        assert_eq!(s.sha256.len(), 64);
    }
}
