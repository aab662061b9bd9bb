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
    /// Divisor d such that every value is float32(byte)/d for a byte
    /// (256 preferred), or the stored pixel divisor of uint8 data.
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

fn scan(t: &Tensor) -> TensorStats {
    let mut st = TensorStats {
        sha256: String::new(),
        min: None,
        max: None,
        multiple_of_1_256: false,
        multiple_of_1_255: false,
        uint8_divisor: None,
        float16_exact: false,
        bfloat16_exact: false,
        float32_exact: false,
        int32_exact: false,
        histogram: None,
    };
    let b = &t.data[..];
    match t.dtype {
        DType::F32 => {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            let (mut m256, mut m255, mut f16x, mut bf16x) = (true, true, true, true);
            for c in b.chunks_exact(4) {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                lo = lo.min(v);
                hi = hi.max(v);
                let k = (v * 256.0).round();
                m256 &= (0.0..=255.0).contains(&k) && k / 256.0 == v;
                let k = (v * 255.0).round();
                m255 &= (0.0..=255.0).contains(&k) && k / 255.0 == v;
                bf16x &= v.to_bits() & 0xffff == 0 && !v.is_nan();
                f16x &= half::f16::from_f32(v).to_f32() == v;
            }
            let any = !b.is_empty();
            st.min = any.then_some(lo as f64);
            st.max = any.then_some(hi as f64);
            st.multiple_of_1_256 = m256 && any;
            st.multiple_of_1_255 = m255 && any;
            st.uint8_divisor = if st.multiple_of_1_256 {
                Some(256)
            } else if st.multiple_of_1_255 {
                Some(255)
            } else {
                None
            };
            st.float16_exact = f16x && any;
            st.bfloat16_exact = bf16x && any;
            st.float32_exact = true;
        }
        DType::F64 => {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            let mut f32x = true;
            for c in b.chunks_exact(8) {
                let v = f64::from_le_bytes(c.try_into().unwrap());
                lo = lo.min(v);
                hi = hi.max(v);
                f32x &= (v as f32) as f64 == v;
            }
            let any = !b.is_empty();
            st.min = any.then_some(lo);
            st.max = any.then_some(hi);
            st.float32_exact = f32x && any;
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
            let any = !b.is_empty();
            st.min = any.then_some(lo as f64);
            st.max = any.then_some(hi as f64);
            st.int32_exact = any && lo >= i32::MIN as i128 && hi <= i32::MAX as i128;
            st.histogram = (!too_many && any).then_some(hist);
            if d == DType::U8 {
                st.uint8_divisor = t.scale_divisor;
                st.float32_exact = t.scale_divisor.is_some();
            }
        }
        _ => {}
    }
    st
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
pub fn dataset_stats(ds: &Dataset) -> DatasetStats {
    let mut tensors = Vec::new();
    let mut fp = Sha256::new();
    for s in &ds.sets {
        for (name, t) in [("x", &s.x), ("y", &s.y)] {
            let st = tensor_stats(t);
            let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            fp.update(format!("{} {} {} {} {}\n", s.name, name, t.dtype, shape.join(","), st.sha256).as_bytes());
            tensors.push((s.name.clone(), name, st));
        }
    }
    DatasetStats {
        tensors,
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
    fn label_histogram() {
        let b: Vec<u8> = [3i64, 1, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = Tensor::new(DType::I64, vec![3], Bytes::from(b)).unwrap();
        let s = tensor_stats(&t);
        assert_eq!(s.histogram.unwrap(), BTreeMap::from([(1, 1), (3, 2)]));
        assert!(s.int32_exact);
        assert_eq!(s.sha256.len(), 64);
    }
}
