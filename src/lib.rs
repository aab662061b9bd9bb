//! minibatchd: loads a training dataset once into pinned host memory and
//! serves minibatches over gRPC to remote trainers.
//!
//! # Layout
//! A minibatch flows top to bottom once: load → store → order → wire → service.
//!
//! - [`memory`]: page-aligned, lockable host buffers the loader fills.
//! - [`load`]: file → tensors: gzip ([`load::gzip`]), a restricted pickle
//!   reader ([`load::pickle`]), the dataset layout ([`load::layout`]) and IDX
//!   files ([`load::idx`]); one error type with file and byte offsets.
//! - [`store`]: the resident dataset: sets of typed tensors as zero-copy slices.
//! - [`analyze`]: per-tensor facts: sha256, value range, label histogram and
//!   which narrower wire dtypes are exact.
//! - [`order`]: which examples a minibatch holds: index math, seeded shuffle,
//!   shards, resume.
//! - [`wire`]: tensors → `TensorChunk` messages: chunking, dtype conversion, CRC-32C.
//! - [`background`]: the dataset analysis's threads, below serving in priority.
//! - [`mirror`]: x tensors pre-converted to uint8 on first demand, so narrow
//!   minibatches are slices too.
//! - [`crc`]: per-example CRC-32Cs folded into chunk CRCs without rereading data.
//! - [`service`]: the tonic `BatchService`: requests in, status codes out.
//! - [`routes`]: GetBatch and StreamBatches framed by hand, so tensor bytes
//!   reach the socket without a copy; GetInfo through tonic.
//! - [`server`]: `run(listener, shutdown)`: thread-per-core serving (each
//!   connection on one single-threaded runtime), health, reflection, limits.
//! - [`access`]: bearer-token auth and TLS / mTLS settings.
//! - [`metrics`]: Prometheus counters and histograms and their HTTP endpoint.
//! - [`client`]: the Rust client other programs (and the CLI) use; it reads
//!   responses with the `grpc-frames` crate (messages straight from HTTP/2
//!   frames) and reassembles them with `tensor-chunks` (crates/), both shared
//!   with the Python client's native transport.
//! - [`proto`]: the generated wire contract (`proto/minibatch/v1/minibatch.proto`).
pub mod access;
pub mod analyze;
pub mod background;
pub mod client;
pub mod crc;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod mirror;
pub mod order;
pub mod routes;
pub mod server;
pub mod service;
pub mod store;
pub mod wire;

/// Generated from `proto/minibatch/v1/minibatch.proto` at build time.
pub mod proto {
    tonic::include_proto!("minibatch.v1");

    /// Encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("minibatch_descriptor");
}

/// Name under which the bundled sample appears in logs and GetInfo.
pub const BUNDLED_SAMPLE_NAME: &str = "mnist-sample.pkl.gz";

/// The bundled sample: 5,000 real MNIST digits (3,000 / 1,000 / 1,000) in
/// the original file's exact pickle form; made by `scripts/make_sample.py`,
/// attribution in `data/README.md`. Built into the binary so the daemon runs
/// with no dataset on any machine or image.
pub static BUNDLED_SAMPLE: &[u8] = include_bytes!("../data/mnist-sample.pkl.gz");
