//! Tensors → `TensorChunk` messages.
//!
//! A contiguous, unconverted minibatch is a zero-copy slice of the loaded
//! buffer; a shuffled or sharded one is gathered, and a converted one written,
//! straight into one outgoing buffer. Either way the tensor is then cut into
//! chunks of at most `chunk_bytes` (all slices of that one buffer), each with
//! its CRC-32C, so every gRPC message stays under the 4 MiB default limit.
use bytes::{BufMut, Bytes, BytesMut};

use crate::order::Selection;
use crate::proto;
use crate::store::{DType, Tensor};

/// Default largest `data` field: about 1 MiB is where both the Rust and the
/// Python gRPC clients measured fastest here (../shared/notes), and it keeps
/// each message far below the 4 MiB default limit of stock clients.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Room left in a message for the fields around `data` (name, shape, ...).
pub const MESSAGE_OVERHEAD: usize = 1024;

/// How one tensor goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    pub from: DType,
    pub to: DType,
    /// For uint8 standing for floats: value = float32(byte) / divisor.
    pub divisor: u32,
}

impl Conversion {
    pub fn identity(t: &Tensor) -> Self {
        Self {
            from: t.dtype,
            to: t.dtype,
            divisor: t.scale_divisor.unwrap_or(0),
        }
    }

    fn is_identity(&self) -> bool {
        self.from == self.to
    }
}

pub fn dtype_to_proto(d: DType) -> proto::Dtype {
    use proto::Dtype as P;
    match d {
        DType::F32 => P::Float32,
        DType::F64 => P::Float64,
        DType::F16 => P::Float16,
        DType::BF16 => P::Bfloat16,
        DType::U8 => P::Uint8,
        DType::I8 => P::Int8,
        DType::I16 => P::Int16,
        DType::U16 => P::Uint16,
        DType::I32 => P::Int32,
        DType::U32 => P::Uint32,
        DType::I64 => P::Int64,
        DType::U64 => P::Uint64,
        DType::Bool => P::Bool,
    }
}

/// None for DTYPE_UNSPECIFIED ("as stored").
pub fn dtype_from_proto(d: proto::Dtype) -> Option<DType> {
    use proto::Dtype as P;
    Some(match d {
        P::Unspecified => return None,
        P::Float32 => DType::F32,
        P::Float64 => DType::F64,
        P::Float16 => DType::F16,
        P::Bfloat16 => DType::BF16,
        P::Uint8 => DType::U8,
        P::Int8 => DType::I8,
        P::Int16 => DType::I16,
        P::Uint16 => DType::U16,
        P::Int32 => DType::I32,
        P::Uint32 => DType::U32,
        P::Int64 => DType::I64,
        P::Uint64 => DType::U64,
        P::Bool => DType::Bool,
    })
}

/// The bytes of `sel`'s examples of `t`, converted as asked.
pub fn tensor_bytes(t: &Tensor, sel: &Selection, conv: &Conversion) -> Bytes {
    if conv.is_identity() {
        match sel {
            Selection::Range(a, b) => return t.rows(*a, *b),
            Selection::Indices(idx) => {
                let mut out = BytesMut::with_capacity(idx.len() * t.row_bytes());
                for &i in idx {
                    out.put_slice(t.row(i));
                }
                return out.freeze();
            }
        }
    }
    let out_row = t.row_elems() * conv.to.size();
    let mut out = BytesMut::with_capacity(sel.len() * out_row);
    let mut put = |row: &[u8]| convert(row, conv, &mut out);
    match sel {
        Selection::Range(a, b) => put(&t.data[a * t.row_bytes()..b * t.row_bytes()]),
        Selection::Indices(idx) => idx.iter().for_each(|&i| put(t.row(i))),
    }
    out.freeze()
}

/// Converts little-endian elements `src` of `conv.from` into `conv.to`,
/// appended to `out`.
fn convert(src: &[u8], conv: &Conversion, out: &mut BytesMut) {
    let start = out.len();
    out.resize(start + src.len() / conv.from.size() * conv.to.size(), 0);
    convert_into(src, conv, &mut out[start..]);
}

/// Converts little-endian elements `src` of `conv.from` into `out`, which
/// holds exactly their `conv.to` bytes. Exactness was checked beforehand
/// (analyze); this only does arithmetic, in plain loops the compiler can
/// vectorize (a per-value `put_*` re-checks capacity every time). Both the
/// per-request path and the mirrors ([`crate::mirror`]) use it, so they
/// send the same bytes.
pub fn convert_into(src: &[u8], conv: &Conversion, out: &mut [u8]) {
    fn fill<const I: usize, const O: usize>(
        src: &[u8],
        out: &mut [u8],
        f: impl Fn([u8; I]) -> [u8; O],
    ) {
        assert_eq!(src.len() / I * O, out.len(), "output sized for the input");
        for (o, c) in out.chunks_exact_mut(O).zip(src.chunks_exact(I)) {
            o.copy_from_slice(&f(c.try_into().unwrap()));
        }
    }
    let d = conv.divisor as f32;
    match (conv.from, conv.to) {
        // Values are k/d (checked), so v*d is within rounding of k in
        // 0..=255. Adding 2^23 rounds it to the nearest integer and leaves
        // that integer in the low mantissa bits: float adds and bit reads
        // only, which vectorize (a float-to-int cast per value does not).
        (DType::F32, DType::U8) => fill(src, out, |c: [u8; 4]| {
            [(f32::from_le_bytes(c) * d + 8_388_608.0).to_bits() as u8]
        }),
        (DType::F32, DType::F16) => fill(src, out, |c: [u8; 4]| {
            half::f16::from_f32(f32::from_le_bytes(c)).to_le_bytes()
        }),
        (DType::F32, DType::BF16) => fill(src, out, |c: [u8; 4]| [c[2], c[3]]),
        (DType::F64, DType::F32) => fill(src, out, |c: [u8; 8]| {
            (f64::from_le_bytes(c) as f32).to_le_bytes()
        }),
        (DType::U8, DType::F32) => fill(src, out, |c: [u8; 1]| (c[0] as f32 / d).to_le_bytes()),
        (DType::I64, DType::I32) => fill(src, out, |c: [u8; 8]| {
            (i64::from_le_bytes(c) as i32).to_le_bytes()
        }),
        (from, to) => unreachable!("conversion {from} -> {to} was not validated"),
    }
}

/// Cuts one tensor of one minibatch into messages.
pub struct TensorMessage<'a> {
    pub index: u64,
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub divisor: u32,
    pub data: Bytes,
}

/// Appends `m`'s chunks to `out`; marks the final chunk `last` if asked.
pub fn chunk(
    m: TensorMessage<'_>,
    chunk_bytes: usize,
    last: bool,
    out: &mut Vec<proto::TensorChunk>,
) {
    chunk_with(m, chunk_bytes, last, out, None);
}

/// As [`chunk`]; with `rows` (the tensor's per-row CRCs and the minibatch's
/// selection, data unconverted) chunks are cut at row boundaries and their
/// CRCs folded from the rows' instead of computed from the bytes.
pub fn chunk_with(
    m: TensorMessage<'_>,
    chunk_bytes: usize,
    last: bool,
    out: &mut Vec<proto::TensorChunk>,
    rows: Option<(&crate::crc::RowCrcs, &Selection)>,
) {
    let total = m.data.len();
    let rows = rows.filter(|(rc, _)| rc.row_bytes() > 0 && rc.row_bytes() <= chunk_bytes);
    let chunk_bytes = match rows {
        Some((rc, _)) => chunk_bytes / rc.row_bytes() * rc.row_bytes(),
        None => chunk_bytes.max(1),
    };
    let mut off = 0;
    loop {
        let end = (off + chunk_bytes).min(total);
        let data = m.data.slice(off..end);
        let crc = match rows {
            Some((rc, sel)) => {
                let (a, b) = (off / rc.row_bytes(), end / rc.row_bytes());
                match sel {
                    Selection::Range(start, _) => rc.of_rows(start + a..start + b),
                    Selection::Indices(idx) => rc.of_rows(idx[a..b].iter().copied()),
                }
            }
            None => crate::crc::checksum(&data),
        };
        out.push(proto::TensorChunk {
            index: m.index,
            name: m.name.to_string(),
            dtype: dtype_to_proto(m.dtype) as i32,
            shape: m.shape.clone(),
            offset: off as u64,
            crc32c: crc,
            data,
            total_bytes: total as u64,
            scale_divisor: m.divisor,
            last: last && end == total,
        });
        off = end;
        if off >= total {
            break;
        }
    }
}

/// Wire dtypes every tensor could be asked for (besides "as stored").
const CANDIDATES: [DType; 5] = [DType::F32, DType::U8, DType::F16, DType::BF16, DType::I32];

/// How `t` goes on the wire as `to`, if that is exact; the error says why not.
/// `stats` (the full-pass facts) decide whether values survive the change.
pub fn conversion(
    t: &Tensor,
    stats: &crate::analyze::TensorStats,
    to: DType,
) -> Result<Conversion, String> {
    if to == t.dtype {
        return Ok(Conversion::identity(t));
    }
    let ok = |divisor| {
        Ok(Conversion {
            from: t.dtype,
            to,
            divisor,
        })
    };
    match (t.dtype, to) {
        (DType::F32, DType::U8) => match stats.uint8_divisor {
            Some(d) => ok(d),
            None => Err(
                "values are not all k/256 or k/255 for k in 0..=255, so uint8 would lose precision"
                    .into(),
            ),
        },
        (DType::F32, DType::F16) if stats.float16_exact => ok(0),
        (DType::F32, DType::F16) => {
            Err("some values are not exactly representable in float16".into())
        }
        (DType::F32, DType::BF16) if stats.bfloat16_exact => ok(0),
        (DType::F32, DType::BF16) => {
            Err("some values are not exactly representable in bfloat16".into())
        }
        (DType::F64, DType::F32) if stats.float32_exact => ok(0),
        (DType::F64, DType::F32) => {
            Err("some values are not exactly representable in float32".into())
        }
        (DType::U8, DType::F32) => match t.scale_divisor {
            Some(d) => ok(d),
            None => Err("uint8 data without a pixel scale has no float meaning".into()),
        },
        (DType::I64, DType::I32) if stats.int32_exact => ok(0),
        (DType::I64, DType::I32) => Err("some values do not fit int32".into()),
        (from, to) => Err(format!("no conversion from {from} to {to} is offered")),
    }
}

/// Wire dtypes `t` converts to exactly, the stored dtype first.
pub fn wire_dtypes(t: &Tensor, stats: &crate::analyze::TensorStats) -> Vec<DType> {
    let mut v = vec![t.dtype];
    v.extend(
        CANDIDATES
            .iter()
            .copied()
            .filter(|&d| d != t.dtype && conversion(t, stats, d).is_ok()),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let b = tensor_bytes(&t, &Selection::Range(1, 3), &id);
        assert_eq!(&b[..], &t.data[8..24]);
        assert_eq!(b.as_ptr(), t.data[8..].as_ptr(), "a range must not copy");
        let g = tensor_bytes(&t, &Selection::Indices(vec![2, 0]), &id);
        assert_eq!(&g[..8], &t.data[16..24]);
        assert_eq!(&g[8..], &t.data[0..8]);
    }

    #[test]
    fn uint8_and_bfloat16_conversions() {
        let t = t();
        let c = Conversion {
            from: DType::F32,
            to: DType::U8,
            divisor: 256,
        };
        let b = tensor_bytes(&t, &Selection::Range(0, 3), &c);
        assert_eq!(&b[..], &[0, 128, 1, 255, 64, 192]);
        let c = Conversion {
            from: DType::F32,
            to: DType::BF16,
            divisor: 0,
        };
        let b = tensor_bytes(&t, &Selection::Range(0, 1), &c);
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
                divisor: d,
            };
            let b = tensor_bytes(&t, &Selection::Range(0, 256), &c);
            assert_eq!(&b[..], &(0..=255u8).collect::<Vec<_>>()[..], "divisor {d}");
        }
    }

    #[test]
    fn folded_chunk_crcs_match_the_bytes() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let t = Tensor::new(DType::U8, vec![300, 10], Bytes::from(data)).unwrap();
        let rc = crate::crc::RowCrcs::new(&t);
        for sel in [
            Selection::Range(17, 250),
            Selection::Indices(vec![299, 3, 150, 3, 0, 42, 7]),
        ] {
            let bytes = tensor_bytes(&t, &sel, &Conversion::identity(&t));
            let mut out = Vec::new();
            let m = TensorMessage {
                index: 0,
                name: "x",
                dtype: DType::U8,
                shape: vec![],
                divisor: 0,
                data: bytes.clone(),
            };
            chunk_with(m, 64, true, &mut out, Some((&rc, &sel)));
            assert!(out
                .iter()
                .all(|c| c.data.len() % 10 == 0 && c.crc32c == crc32c::crc32c(&c.data)));
            assert_eq!(out.iter().map(|c| c.data.len()).sum::<usize>(), bytes.len());
        }
    }

    #[test]
    fn chunks_cover_the_tensor_with_crcs() {
        let data = Bytes::from((0..2500u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut out = Vec::new();
        let m = TensorMessage {
            index: 7,
            name: "x",
            dtype: DType::U8,
            shape: vec![2500],
            divisor: 0,
            data: data.clone(),
        };
        chunk(m, 1000, true, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![0, 1000, 2000]
        );
        assert!(out.iter().all(|c| c.crc32c == crc32c::crc32c(&c.data)));
        assert_eq!(out.iter().filter(|c| c.last).count(), 1);
        assert!(out[2].last);
    }
}
