//! Exact wire dtypes: which narrower dtype a tensor may be sent as (only
//! when every value survives, from the background analysis), and the
//! arithmetic that converts. Both the per-request path and the mirrors
//! ([`super::mirror`]) convert with [`convert_into`], so they send the same
//! bytes.
use crate::analyze::TensorStats;
use crate::store::{DType, Tensor};

/// How one tensor goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    pub from: DType,
    pub to: DType,
    /// For uint8 standing for floats: value = float32(byte) / scale_divisor.
    pub scale_divisor: u32,
}

impl Conversion {
    pub fn identity(t: &Tensor) -> Self {
        Self {
            from: t.dtype,
            to: t.dtype,
            scale_divisor: t.scale_divisor.unwrap_or(0),
        }
    }

    pub fn is_identity(&self) -> bool {
        self.from == self.to
    }
}

/// Converts little-endian elements `src` of `conv.from` into `out`, which
/// holds exactly their `conv.to` bytes. Exactness was checked beforehand
/// (analyze); this only does arithmetic, in plain loops the compiler can
/// vectorize (a per-value `put_*` re-checks capacity every time).
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
    let d = conv.scale_divisor as f32;
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

/// Wire dtypes every tensor could be asked for (besides "as stored").
const CANDIDATES: [DType; 5] = [DType::F32, DType::U8, DType::F16, DType::BF16, DType::I32];

/// How `t` goes on the wire as `to`, if that is exact; the error says why not.
/// `stats` (the full-pass facts) decide whether values survive the change.
pub fn conversion(t: &Tensor, stats: &TensorStats, to: DType) -> Result<Conversion, String> {
    if to == t.dtype {
        return Ok(Conversion::identity(t));
    }
    let ok = |scale_divisor| {
        Ok(Conversion {
            from: t.dtype,
            to,
            scale_divisor,
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
pub fn wire_dtypes(t: &Tensor, stats: &TensorStats) -> Vec<DType> {
    let mut v = vec![t.dtype];
    v.extend(
        CANDIDATES
            .iter()
            .copied()
            .filter(|&d| d != t.dtype && conversion(t, stats, d).is_ok()),
    );
    v
}
