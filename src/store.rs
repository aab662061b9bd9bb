//! The resident dataset: named sets of typed tensors in host memory.
//!
//! Every tensor's bytes are a [`Bytes`] slice of a [`HostBuffer`](crate::memory::HostBuffer)
//! that the loader filled (normally the very buffer the decompressor wrote),
//! so handing a minibatch to the wire is a reference-count bump, never a copy
//! of the dataset.
//!
//! Tiers: today a tensor lives in one tier, host memory (`Tensor::data`). The
//! planned device tier adds a second, optional location per tensor (a device
//! allocation filled once from `data`). Minibatch assembly ([`crate::batch`])
//! reads rows through [`Tensor::rows`] / [`Tensor::row`] and whole tensors
//! through `data` (dtype mirrors, row CRCs); a device tier adds its own
//! location beside `data` rather than changing those readers.
use bytes::Bytes;

pub use crate::dtype::DType;
use crate::memory::{Backing, PinState, Resident};

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
        let want = dtype
            .array_bytes(&shape)
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
    Npz,
    Npy,
    /// CIFAR-10, python version: the downloaded `.tar.gz` or its folder.
    Cifar10,
    /// CIFAR-100, python version: the downloaded `.tar.gz` or its folder.
    Cifar100,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Pickle => "pickle",
            Format::PickleGzip => "pickle+gzip",
            Format::Idx => "idx",
            Format::Npz => "npz",
            Format::Npy => "npy",
            Format::Cifar10 => "cifar-10",
            Format::Cifar100 => "cifar-100",
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
    /// The sealed buffers the tensors are slices of (what same-host
    /// clients attach to); empty for datasets built in memory by tests.
    pub memory: Vec<Resident>,
}

impl Dataset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// Whether the dataset lives in shared memory (memfds), so that copies
    /// derived from it (mirrors) should too.
    pub fn backing(&self) -> Backing {
        if !self.memory.is_empty() && self.memory.iter().all(|m| m.fd().is_some()) {
            Backing::Shared
        } else {
            Backing::Private
        }
    }

    /// Where `t`'s bytes lie in [`memory`](Self::memory): (buffer, offset).
    pub fn locate(&self, t: &Tensor) -> Option<(usize, usize)> {
        self.memory
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.offset_of(&t.data).map(|o| (i, o)))
    }

    /// Bytes of tensor data (what a user would call the dataset's size).
    pub fn tensor_bytes(&self) -> usize {
        self.sets
            .iter()
            .map(|s| s.x.data.len() + s.y.data.len())
            .sum()
    }
}
