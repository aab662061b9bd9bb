//! Why a stream of chunks is not what the call asked for.
//!
//! Every error says what was wrong and where (minibatch index, tensor,
//! byte offset); names and shapes sent by the server are echoed shortened,
//! so a hostile one cannot make an error message large.

/// A stream of `TensorChunk`s that is not a valid answer to the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("minibatch {index}, tensor {tensor}: chunk at offset {offset} failed its CRC-32C check (data corrupted in transit)")]
    Checksum {
        index: u64,
        tensor: String,
        offset: u64,
    },
    #[error("response message is not a valid TensorChunk: {0}")]
    Decode(String),
    #[error("minibatch {index}: tensor {tensor:?} arrived where {expected} was due")]
    UnexpectedTensor {
        index: u64,
        tensor: String,
        expected: &'static str,
    },
    #[error("minibatch {index}, tensor {tensor}: total_bytes {total_bytes} exceeds the {} bytes asked for ({rows} rows of at most {row_bytes} bytes)", .rows.saturating_mul(*.row_bytes))]
    TooLarge {
        index: u64,
        tensor: String,
        total_bytes: u64,
        rows: u64,
        row_bytes: u64,
    },
    #[error("minibatch {index}, tensor {tensor}: dtype {got} where {} was asked for", expected.map_or("a known dtype".to_string(), |d| format!("dtype {d}")))]
    Dtype {
        index: u64,
        tensor: String,
        got: i32,
        /// None: `got` is no dtype at all (unspecified or unknown).
        expected: Option<i32>,
    },
    #[error("minibatch {index}, tensor {tensor}: {rows} rows where {} {expected} were asked for", if *.exact { "exactly" } else { "at most" })]
    Rows {
        index: u64,
        tensor: String,
        rows: u64,
        expected: u64,
        exact: bool,
    },
    #[error("minibatch {index}, tensor {tensor}: {rows} rows, but {first} in the minibatch's first tensor")]
    RowsDiffer {
        index: u64,
        tensor: String,
        rows: u64,
        first: u64,
    },
    #[error("minibatch {index}, tensor {tensor}: shape {shape} where {expected} was expected")]
    Shape {
        index: u64,
        tensor: String,
        shape: String,
        expected: String,
    },
    #[error("minibatch {index}, tensor {tensor}: shape {shape} of dtype {dtype} does not make total_bytes {total_bytes}")]
    ShapeBytes {
        index: u64,
        tensor: String,
        shape: String,
        dtype: i32,
        total_bytes: u64,
    },
    #[error(
        "minibatch {index}, tensor {tensor}: {field} changed between chunks (at offset {offset})"
    )]
    Changed {
        index: u64,
        tensor: String,
        field: &'static str,
        offset: u64,
    },
    #[error("minibatch {index}, tensor {tensor}: {}", offset_problem(*.offset, *.expected))]
    Offset {
        index: u64,
        tensor: String,
        offset: u64,
        expected: u64,
    },
    #[error("minibatch {index}, tensor {tensor}: chunk at offset {offset} of {len} bytes runs past total_bytes {total_bytes}")]
    PastEnd {
        index: u64,
        tensor: String,
        offset: u64,
        len: u64,
        total_bytes: u64,
    },
    #[error("minibatch {index}, tensor {tensor}: empty chunk at offset {offset} (only a 0-byte tensor's one chunk may be empty)")]
    EmptyChunk {
        index: u64,
        tensor: String,
        offset: u64,
    },
    #[error("minibatch {index}, tensor {tensor} ended at {received} of {total_bytes} bytes")]
    TensorShort {
        index: u64,
        tensor: String,
        received: u64,
        total_bytes: u64,
    },
    #[error("minibatch {index} lacks {} (tensor {tensor:?} missing)", if *.tensor == "indices" { "the indices asked for" } else { "x or y" })]
    Missing { index: u64, tensor: &'static str },
    #[error("minibatch {index} began before minibatch {unfinished} ended")]
    Interleaved { index: u64, unfinished: u64 },
    #[error("minibatch {index} arrived where minibatch {expected} was due")]
    BatchIndex { index: u64, expected: u64 },
    #[error("minibatch {index} is one more than the {max} the call asked for (stream cut)")]
    TooManyBatches { index: u64, max: u64 },
    #[error("the stream ended in the middle of minibatch {index}")]
    EndedMidBatch { index: u64 },
    #[error("the stream ended after {got} minibatches; the call asked for {min}")]
    TooFewBatches { got: u64, min: u64 },
}

/// The wording the Python client's own assembler uses too, so both
/// transports say the same.
fn offset_problem(offset: u64, expected: u64) -> String {
    if expected == 0 {
        format!("starts at offset {offset}")
    } else {
        format!("chunk at offset {offset} out of order (expected offset {expected})")
    }
}

impl ChunkError {
    /// True for a CRC-32C mismatch (data damaged in transit); every other
    /// error is the server breaking the protocol or the request's bounds.
    pub fn is_checksum(&self) -> bool {
        matches!(self, ChunkError::Checksum { .. })
    }
}

/// A name from the wire, shortened for an error message.
pub(crate) fn short(name: &str) -> String {
    const MAX: usize = 32;
    match name.char_indices().nth(MAX) {
        None => name.to_string(),
        Some((cut, _)) => format!("{}…", &name[..cut]),
    }
}

/// A shape from the wire, its first dimensions only, for an error message.
pub(crate) fn dims(shape: &[u64]) -> String {
    const MAX: usize = 8;
    if shape.len() <= MAX {
        format!("{shape:?}")
    } else {
        format!("{:?}… ({} dimensions)", &shape[..MAX], shape.len())
    }
}
