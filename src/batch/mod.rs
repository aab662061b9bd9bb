//! Minibatch assembly: from resident tensors to encoded `TensorChunk`
//! frames, one chunk at a time.
//!
//! In flow order:
//! - [`prepared`]: the dataset made ready to serve (per-tensor row CRCs and
//!   mirrors, statistics, shuffles, limits, the memory budget).
//! - [`convert`]: which narrower wire dtypes are exact, and the arithmetic.
//! - [`mirror`]: x tensors pre-converted to uint8 on first demand, so narrow
//!   minibatches are slices too.
//! - [`crc`]: per-row CRC-32Cs folded into chunk CRCs without rereading data.
//! - [`budget`]: the one memory budget for bytes gathered per request.
//! - [`gather`]: one chunk's bytes: a zero-copy slice, or rows gathered
//!   (and converted) into a budgeted buffer.
//! - [`stream`]: the response stream: minibatches → chunks, pulled by the
//!   transport.
//! - [`frame`]: a chunk as the bytes of a gRPC message, `data` uncopied.
pub mod budget;
pub mod convert;
pub mod crc;
pub mod frame;
pub mod gather;
pub mod mirror;
pub mod prepared;
pub mod stream;
