//! The bytes of one tensor of one minibatch, a byte range (one chunk) at a
//! time: a zero-copy slice of the resident tensor when the examples are
//! contiguous and unconverted, otherwise the selected rows copied (and
//! converted) into the caller's buffer.
//!
//! Working per chunk, not per minibatch, is what bounds a stream's memory
//! by its chunk size: the audit's GetBatch(7,000, shuffled, 1-byte chunks)
//! gathered the whole minibatch and queued 5.7 GB of chunk messages at once.
use std::ops::Range;

use bytes::Bytes;

use super::convert::{convert_into, Conversion};
use crate::order::Selection;
use crate::store::Tensor;

/// Where the rows of one outgoing tensor come from.
#[derive(Debug, Clone)]
pub enum Rows {
    /// Rows of `tensor` in the selection's order, converted by `conv`.
    Tensor { tensor: Tensor, conv: Conversion },
    /// The selection's example indices as little-endian int64.
    Indices,
}

/// Bytes per example of the int64 `indices` tensor.
const INDEX_BYTES: usize = 8;

impl Rows {
    /// Output bytes per example.
    pub fn row_bytes(&self) -> usize {
        match self {
            Rows::Tensor { tensor, conv } => tensor.row_elems() * conv.to.size(),
            Rows::Indices => INDEX_BYTES,
        }
    }

    /// Output bytes per element: chunks are cut at multiples of it.
    pub fn elem_bytes(&self) -> usize {
        match self {
            Rows::Tensor { conv, .. } => conv.to.size(),
            Rows::Indices => INDEX_BYTES,
        }
    }

    /// Output bytes `range` as a slice of the resident tensor, when they
    /// are one (contiguous examples, no conversion).
    pub fn slice(&self, sel: &Selection, range: Range<usize>) -> Option<Bytes> {
        match (self, sel) {
            (Rows::Tensor { tensor, conv }, Selection::Range(a, _)) if conv.is_identity() => {
                let base = a * tensor.row_bytes();
                Some(tensor.data.slice(base + range.start..base + range.end))
            }
            _ => None,
        }
    }

    /// Appends output bytes `range` (element-aligned) to `out`.
    ///
    /// Appending, not writing into a zeroed buffer: zero-filling a 1.6 MB
    /// gathered minibatch first added 0.1 ms to a shuffled stream's p50
    /// here (`bench/ab.py`), as much as the gather itself.
    pub fn fill(&self, sel: &Selection, range: Range<usize>, out: &mut Vec<u8>) {
        let (tensor, conv) = match self {
            Rows::Indices => {
                for k in range.start / INDEX_BYTES..range.end / INDEX_BYTES {
                    out.extend_from_slice(&(sel.get(k) as i64).to_le_bytes());
                }
                return;
            }
            Rows::Tensor { tensor, conv } => (tensor, conv),
        };
        let (from, to) = (conv.from.size(), conv.to.size());
        // Output offset -> source offset, within element boundaries.
        let src = |o: usize| o / to * from;
        let mut put = |src: &[u8]| {
            if conv.is_identity() {
                out.extend_from_slice(src)
            } else {
                let start = out.len();
                out.resize(start + src.len() / from * to, 0);
                convert_into(src, conv, &mut out[start..])
            }
        };
        if let Selection::Range(a, _) = sel {
            // Contiguous examples: one pass over the span.
            let base = a * tensor.row_bytes();
            put(&tensor.data[base + src(range.start)..base + src(range.end)]);
            return;
        }
        let out_row = self.row_bytes();
        let mut pos = range.start;
        while pos < range.end {
            let k = pos / out_row;
            let (lo, hi) = (pos - k * out_row, out_row.min(range.end - k * out_row));
            put(&tensor.row(sel.get(k))[src(lo)..src(hi)]);
            pos += hi - lo;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::DType;

    /// The whole output tensor of `sel`, through [`Rows::fill`].
    pub(crate) fn gather_all(t: &Tensor, sel: &Selection, conv: &Conversion) -> Vec<u8> {
        let rows = Rows::Tensor {
            tensor: t.clone(),
            conv: *conv,
        };
        let mut out = Vec::new();
        rows.fill(sel, 0..sel.len() * rows.row_bytes(), &mut out);
        out
    }

    fn t() -> Tensor {
        let v: Vec<u8> = [0.0f32, 0.5, 1.0 / 256.0, 1.0 - 1.0 / 256.0, 0.25, 0.75]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        Tensor::new(DType::F32, vec![3, 2], Bytes::from(v)).unwrap()
    }

    #[test]
    fn zero_copy_range_and_gather() {
        let t = t();
        let id = Conversion::identity(&t);
        let rows = Rows::Tensor {
            tensor: t.clone(),
            conv: id,
        };
        let b = rows.slice(&Selection::Range(1, 3), 0..16).unwrap();
        assert_eq!(&b[..], &t.data[8..24]);
        assert_eq!(b.as_ptr(), t.data[8..].as_ptr(), "a range must not copy");
        assert!(rows.slice(&Selection::Indices(vec![2, 0]), 0..16).is_none());
        let g = gather_all(&t, &Selection::Indices(vec![2, 0]), &id);
        assert_eq!(&g[..8], &t.data[16..24]);
        assert_eq!(&g[8..], &t.data[0..8]);
    }

    #[test]
    fn uint8_and_bfloat16_conversions() {
        let t = t();
        let c = Conversion {
            from: DType::F32,
            to: DType::U8,
            scale_divisor: 256,
        };
        let rows = Rows::Tensor {
            tensor: t.clone(),
            conv: c,
        };
        assert!(rows.slice(&Selection::Range(0, 3), 0..6).is_none());
        let b = gather_all(&t, &Selection::Range(0, 3), &c);
        assert_eq!(&b[..], &[0, 128, 1, 255, 64, 192]);
        let c = Conversion {
            from: DType::F32,
            to: DType::BF16,
            scale_divisor: 0,
        };
        let b = gather_all(&t, &Selection::Range(0, 1), &c);
        assert_eq!(&b[..], &[0, 0, 0, 0x3f]);
    }

    #[test]
    fn uint8_conversion_is_exact_for_every_byte_and_both_divisors() {
        for d in [256u32, 255] {
            let v: Vec<u8> = (0..=255u32)
                .flat_map(|k| (k as f32 / d as f32).to_le_bytes())
                .collect();
            let t = Tensor::new(DType::F32, vec![256, 1], Bytes::from(v)).unwrap();
            let c = Conversion {
                from: DType::F32,
                to: DType::U8,
                scale_divisor: d,
            };
            let b = gather_all(&t, &Selection::Range(0, 256), &c);
            assert_eq!(&b[..], &(0..=255u8).collect::<Vec<_>>()[..], "divisor {d}");
        }
    }

    /// Any element-aligned byte range, filled alone, is that range of the
    /// whole tensor: chunks may start and end inside rows.
    #[test]
    fn ranges_inside_rows_equal_the_whole() {
        let v: Vec<u8> = (0..7u32 * 5)
            .flat_map(|i| ((i % 256) as f32 / 256.0).to_le_bytes())
            .collect();
        let t = Tensor::new(DType::F32, vec![7, 5], Bytes::from(v)).unwrap();
        let narrow = Conversion {
            from: DType::F32,
            to: DType::U8,
            scale_divisor: 256,
        };
        for conv in [Conversion::identity(&t), narrow] {
            for sel in [Selection::Range(1, 6), Selection::Indices(vec![6, 0, 3, 3])] {
                let rows = Rows::Tensor {
                    tensor: t.clone(),
                    conv,
                };
                let whole = gather_all(&t, &sel, &conv);
                let e = rows.elem_bytes();
                for a in (0..whole.len()).step_by(e) {
                    for b in (a..=whole.len()).step_by(e) {
                        let mut out = Vec::new();
                        rows.fill(&sel, a..b, &mut out);
                        assert_eq!(out, whole[a..b], "{conv:?} {sel:?} {a}..{b}");
                    }
                }
            }
        }
        let mut out = Vec::new();
        Rows::Indices.fill(&Selection::Indices(vec![9, 4, 7]), 8..24, &mut out);
        assert_eq!(out[..8], 4i64.to_le_bytes());
        assert_eq!(out[8..], 7i64.to_le_bytes());
    }
}
