//! Element types: the one table of what the project knows about each dtype
//! (size, numpy's name and type code, the wire contract's enum value).
//! Everything else (the loader, conversions, GetInfo, the clients' CLI)
//! asks this table instead of writing its own `match`.
use crate::proto;

/// Element type of a tensor. Data is always little-endian, C order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    Bool,
}

/// One row of [`TABLE`].
struct Facts {
    dtype: DType,
    /// Bytes per element.
    size: usize,
    /// numpy's name (`bfloat16` has none in numpy; the name is ml_dtypes').
    name: &'static str,
    /// numpy's short type code as pickled `numpy.dtype` objects carry it.
    numpy_code: Option<&'static str>,
    wire: proto::Dtype,
}

const fn row(
    dtype: DType,
    size: usize,
    name: &'static str,
    numpy_code: Option<&'static str>,
    wire: proto::Dtype,
) -> Facts {
    Facts {
        dtype,
        size,
        name,
        numpy_code,
        wire,
    }
}

/// Every dtype, once.
const TABLE: [Facts; 13] = [
    row(DType::F32, 4, "float32", Some("f4"), proto::Dtype::Float32),
    row(DType::F64, 8, "float64", Some("f8"), proto::Dtype::Float64),
    row(DType::F16, 2, "float16", Some("f2"), proto::Dtype::Float16),
    row(DType::BF16, 2, "bfloat16", None, proto::Dtype::Bfloat16),
    row(DType::U8, 1, "uint8", Some("u1"), proto::Dtype::Uint8),
    row(DType::I8, 1, "int8", Some("i1"), proto::Dtype::Int8),
    row(DType::I16, 2, "int16", Some("i2"), proto::Dtype::Int16),
    row(DType::U16, 2, "uint16", Some("u2"), proto::Dtype::Uint16),
    row(DType::I32, 4, "int32", Some("i4"), proto::Dtype::Int32),
    row(DType::U32, 4, "uint32", Some("u4"), proto::Dtype::Uint32),
    row(DType::I64, 8, "int64", Some("i8"), proto::Dtype::Int64),
    row(DType::U64, 8, "uint64", Some("u8"), proto::Dtype::Uint64),
    row(DType::Bool, 1, "bool", Some("b1"), proto::Dtype::Bool),
];

impl DType {
    /// Every dtype, in the table's order.
    pub fn all() -> impl Iterator<Item = DType> {
        TABLE.iter().map(|f| f.dtype)
    }

    fn facts(self) -> &'static Facts {
        // The table lists the variants in declaration order.
        &TABLE[self as usize]
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.facts().size
    }

    /// Bytes of a C-order array of `shape` (elements × size); None when it
    /// overflows.
    pub fn array_bytes(self, shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(self.size(), |a, &d| a.checked_mul(d))
    }

    /// numpy's name for the type.
    pub fn name(self) -> &'static str {
        self.facts().name
    }

    /// The dtype numpy calls `name` (`float32`, `uint8`, ...).
    pub fn from_name(name: &str) -> Option<DType> {
        TABLE.iter().find(|f| f.name == name).map(|f| f.dtype)
    }

    /// Parses numpy's short type code (`f4`, `i8`, `u1`, `b1`, ...) as it
    /// appears in pickled `numpy.dtype` objects.
    pub fn from_numpy_code(code: &str) -> Option<DType> {
        TABLE
            .iter()
            .find(|f| f.numpy_code == Some(code))
            .map(|f| f.dtype)
    }

    /// numpy's array-protocol type string (`<f4`, `|u1`): the `.npy`
    /// header's `descr`. bfloat16, which numpy lacks, is its raw 16-bit words.
    pub fn npy_descr(self) -> String {
        let code = self.facts().numpy_code.unwrap_or("u2");
        let order = if self.size() == 1 { '|' } else { '<' };
        format!("{order}{code}")
    }

    /// The wire contract's enum value.
    pub fn to_proto(self) -> proto::Dtype {
        self.facts().wire
    }

    /// None for DTYPE_UNSPECIFIED ("as stored").
    pub fn from_proto(d: proto::Dtype) -> Option<DType> {
        TABLE.iter().find(|f| f.wire == d).map(|f| f.dtype)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_integer(self) -> bool {
        !self.is_float() && self != DType::Bool
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;

    /// numpy's name (`float32`, `uint8`, `bfloat16`, ...), for command lines.
    fn from_str(s: &str) -> Result<Self, String> {
        DType::from_name(s).ok_or_else(|| {
            let names: Vec<_> = DType::all().map(DType::name).collect();
            format!("unknown dtype {s:?}; one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_follow_the_variants_and_round_trip() {
        for (i, d) in DType::all().enumerate() {
            assert_eq!(d as usize, i, "{d} sits at its variant's index");
            assert_eq!(DType::from_proto(d.to_proto()), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        assert_eq!(DType::from_proto(proto::Dtype::Unspecified), None);
        assert_eq!(DType::from_numpy_code("f4"), Some(DType::F32));
        assert_eq!(DType::from_numpy_code("b1"), Some(DType::Bool));
        assert_eq!(DType::from_numpy_code("V8"), None);
        assert!("complex64".parse::<DType>().is_err());
        assert_eq!(DType::F32.npy_descr(), "<f4");
        assert_eq!(DType::U8.npy_descr(), "|u1");
        assert_eq!(DType::Bool.npy_descr(), "|b1");
        assert_eq!(DType::BF16.npy_descr(), "<u2");
    }

    /// Sizes agree with the names (numpy's itemsize).
    #[test]
    fn sizes() {
        let got: Vec<_> = DType::all().map(|d| (d.name(), d.size())).collect();
        assert_eq!(
            got,
            [
                ("float32", 4),
                ("float64", 8),
                ("float16", 2),
                ("bfloat16", 2),
                ("uint8", 1),
                ("int8", 1),
                ("int16", 2),
                ("uint16", 2),
                ("int32", 4),
                ("uint32", 4),
                ("int64", 8),
                ("uint64", 8),
                ("bool", 1),
            ]
        );
    }
}
