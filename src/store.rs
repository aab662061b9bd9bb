//! The resident dataset: named sets of typed tensors in host memory.
//!
//! Every tensor's bytes are a [`Bytes`] slice of a [`HostBuffer`](crate::memory::HostBuffer)
//! that the loader filled (normally the very buffer the decompressor wrote),
//! so handing a minibatch to the wire is a reference-count bump, never a copy
//! of the dataset.
//!
//! Tiers: today a tensor lives in one tier, host memory (`Tensor::data`). The
//! planned device tier adds a second, optional location per tensor (a device
//! allocation filled once from `data`); the order and wire modules address
//! tensors only through [`Tensor::rows`] / [`Tensor::row`], so they stay
//! unchanged when that tier arrives.
use bytes::Bytes;

use crate::memory::PinState;

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

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// numpy's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }

    /// Parses numpy's short type code (`f4`, `i8`, `u1`, `b1`, ...) as it
    /// appears in pickled `numpy.dtype` objects.
    pub fn from_numpy_code(code: &str) -> Option<DType> {
        Some(match code {
            "f4" => DType::F32,
            "f8" => DType::F64,
            "f2" => DType::F16,
            "u1" => DType::U8,
            "i1" => DType::I8,
            "i2" => DType::I16,
            "u2" => DType::U16,
            "i4" => DType::I32,
            "u4" => DType::U32,
            "i8" => DType::I64,
            "u8" => DType::U64,
            "b1" => DType::Bool,
            _ => return None,
        })
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

/// One tensor: `shape[0]` examples of `shape[1..]` elements each.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: DType,
    /// Full shape; the first dimension counts examples.
    pub shape: Vec<usize>,
    /// Little-endian, C-order bytes, exactly `numel * dtype.size()` long.
    pub data: Bytes,
    /// For uint8 pixels that stand for floats (IDX files):
    /// value = float32(byte) / divisor.
    pub scale_divisor: Option<u32>,
}

impl Tensor {
    /// Builds a tensor, checking that `data` holds exactly the shape.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Bytes) -> Result<Self, String> {
        let want = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if shape.is_empty() {
            return Err("a tensor needs at least one dimension (examples)".into());
        }
        if want != data.len() {
            return Err(format!(
                "shape {shape:?} of {dtype} needs {want} bytes, data holds {}",
                data.len()
            ));
        }
        Ok(Self {
            dtype,
            shape,
            data,
            scale_divisor: None,
        })
    }

    pub fn examples(&self) -> usize {
        self.shape[0]
    }

    /// Elements in one example.
    pub fn row_elems(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// Bytes in one example.
    pub fn row_bytes(&self) -> usize {
        self.row_elems() * self.dtype.size()
    }

    /// Examples `[start, end)` as one zero-copy slice.
    pub fn rows(&self, start: usize, end: usize) -> Bytes {
        let rb = self.row_bytes();
        self.data.slice(start * rb..end * rb)
    }

    /// Example `i`'s bytes.
    pub fn row(&self, i: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }
}

/// A named split of the dataset: inputs `x` and labels `y`, same length.
#[derive(Debug, Clone)]
pub struct Set {
    pub name: String,
    pub x: Tensor,
    pub y: Tensor,
}

impl Set {
    pub fn examples(&self) -> usize {
        self.x.examples()
    }
}

/// Where a dataset came from, detected by content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pickle,
    PickleGzip,
    Idx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Pickle => "pickle",
            Format::PickleGzip => "pickle+gzip",
            Format::Idx => "idx",
        }
    }
}

/// The whole loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Path it was loaded from, as given.
    pub source: String,
    pub format: Format,
    pub sets: Vec<Set>,
    /// Host bytes held (all buffers, including pickle framing between tensors).
    pub memory_bytes: usize,
    /// Whether every buffer is locked in RAM.
    pub pin: PinState,
}

impl Dataset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// Bytes of tensor data (what a user would call the dataset's size).
    pub fn tensor_bytes(&self) -> usize {
        self.sets
            .iter()
            .map(|s| s.x.data.len() + s.y.data.len())
            .sum()
    }
}
