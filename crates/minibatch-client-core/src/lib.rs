//! The client core both Rust clients of minibatchd share: the Rust client
//! (`minibatchd::client`, which the CLI and tests use) and the Python
//! client's native transport (clients/python/native, a thin PyO3 layer over
//! this crate).
//!
//! - [`Config`] → [`Connection`]: the endpoint with the HTTP/2 settings
//!   measured fastest here, TLS, a bearer token, and the bounds on what a
//!   server may send ([`DEFAULT_MAX_MESSAGE_BYTES`] per message, and per
//!   example [`DEFAULT_MAX_EXAMPLE_BYTES`] until GetInfo's shapes are known).
//! - [`Connection::stream`] / [`Connection::one_batch`]: GetBatch and
//!   StreamBatches, read with `grpc_frames` (messages straight from the
//!   HTTP/2 frames, no decoder copy) and reassembled by
//!   `tensor_chunks::Assembler` against what the request asked for, so a
//!   broken or hostile server gets a typed [`ClientError`] instead of the
//!   client's memory.
//! - The wire contract, generated from proto/minibatch/v1/minibatch.proto by
//!   `tensor_chunks` and re-exported here: [`proto`], the method paths
//!   ([`GET_BATCH`], [`STREAM_BATCHES`], [`GET_INFO`]) and [`DATA_FIELD`].
//!
//! This crate does not depend on the daemon crate: the native transport
//! builds standalone (maturin, from clients/python/native) with crates/ as
//! path dependencies.
use std::time::Duration;

mod call;
mod config;
mod error;

pub use call::{BatchStream, Connection, Request};
pub use config::{Config, Tls};
pub use error::ClientError;

pub use grpc_frames;
pub use tensor_chunks;
pub use tensor_chunks::{
    checksum, proto, Batch, ChunkError, Expect, Known, Tensor, BATCH_SERVICE, DATA_FIELD,
    DEFAULT_MAX_EXAMPLE_BYTES, GET_BATCH, GET_INFO, STREAM_BATCHES,
};

/// HTTP/2 max frame size the client advertises. The server's DATA frames are
/// bounded by it; 16 KiB (the default) halves throughput here. With the
/// server's zero-copy framing, 2 MiB (a 500-image float32 minibatch in one
/// frame) measured best for GetBatch(500): 1.43–1.48 GB/s against 1.10 at
/// 512 KiB and 1.29–1.37 at 4 MiB, StreamBatches the same within noise
/// (BENCHMARKS.md, "What profiling changed").
pub const MAX_FRAME_SIZE: u32 = 2 << 20;

/// HTTP/2 allows frame sizes 16 KiB ..= 16 MiB - 1 (RFC 9113, 6.5.2); a
/// configured size is clamped into that range.
pub const FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = (16 << 10)..=((16 << 20) - 1);

/// Flow-control window per stream: a few minibatches in flight.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Flow-control window per connection: two streams' worth.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// Largest response message accepted, until the server's own limit is known
/// (GetInfo's `limits.max_message_bytes`, 4 MiB by default, which then
/// lowers it). 16 times the server's default leaves room for servers run
/// with a larger `--max-message-bytes`, and bounds what a broken or hostile
/// server can make the client buffer for one message. Both clients use it
/// (the native transport used to accept 1 GiB messages; with an endless
/// stream a hostile server drove it past 3 GB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Chunk size the Rust clients ask for (`max_chunk_bytes`): whole tensors
/// up to the server's default 4 MiB message limit, so a minibatch under
/// ~4 MB arrives as one message that becomes the tensor without a copy (the
/// server's 1 MiB default suits grpcio clients, for which bigger messages
/// measured slower). The server caps it to fit its own message limit.
pub const WHOLE_MESSAGES: u32 = (4 << 20) - 4096;

/// How long a connection attempt may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
