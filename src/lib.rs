//! minibatchd: loads a training dataset once into pinned host memory and
//! serves minibatches over gRPC to remote trainers.
//!
//! # Layout
//! A minibatch flows top to bottom once:
//! load → store → order → batch → catalog → service → routes → server.
//!
//! - [`memory`]: page-aligned, lockable host buffers (memfds) the loader
//!   fills, sealed read-only once loaded.
//! - [`load`]: file → tensors: gzip ([`load::gzip`]), a restricted pickle
//!   reader ([`load::pickle`]), the dataset layout ([`load::layout`]), IDX
//!   files ([`load::idx`]), `.npz` ([`load::npz`]), tar archives
//!   ([`load::tar`]) and CIFAR's batches ([`load::cifar`]); one error type
//!   with file and byte offsets.
//! - [`dtype`]: the one table of element types (size, numpy names, wire enum).
//! - [`store`]: the resident dataset: sets of typed tensors as zero-copy slices.
//! - [`analyze`]: per-tensor facts: sha256, value range, label histogram and
//!   which narrower wire dtypes are exact; [`background`] runs it below
//!   serving in priority.
//! - [`order`]: which examples a minibatch holds: index math, seeded shuffle,
//!   shards, resume.
//! - [`batch`]: minibatch assembly: the prepared dataset (row CRCs, uint8
//!   mirrors, limits, the memory budget) and the pull-based stream that
//!   slices or gathers one chunk at a time into encoded frames.
//! - [`device`]: the device tier: each dataset copied once into each
//!   GPU's memory (`--device`) and exported by CUDA IPC for attach.
//! - [`catalog`]: the datasets one daemon serves, by name (`--data
//!   NAME=PATH`): loaded side by side, each prepared once, all sharing one
//!   budget and metrics.
//! - [`service`]: BatchService's requests validated and answered (GetInfo,
//!   or a [`batch::stream::BatchStream`]); [`error`] maps every failure to
//!   one status code.
//! - [`attach`]: the same-host tier beside the service: a client on the
//!   Unix socket receives the dataset's sealed memfds and maps them
//!   (the daemon's side and the Rust client's).
//! - [`routes`]: the service over HTTP/2: token check, bounded request
//!   reading, response frames.
//! - [`server`]: `run(listener, shutdown)`: thread-per-core serving (each
//!   connection on one single-threaded runtime), health, reflection and
//!   graceful shutdown; its accept loop and connection slots, handshake
//!   deadlines and budget holders; [`access`] holds the token and
//!   TLS settings, [`metrics`] the Prometheus endpoint.
//! - [`status`]: what the daemon is doing, for people: the bounded registry
//!   of open streams and attached processes, `/status.json`, the status
//!   page and the minibatch viewer (`/minibatch.png`) on the metrics
//!   address.
//! - [`client`]: the Rust client other programs (and the CLI) use; it reads
//!   responses with the `grpc-frames` crate (messages straight from HTTP/2
//!   frames) and reassembles them with `tensor-chunks` (crates/), both shared
//!   with the Python client's native transport.
//! - [`cli`]: what the command-line tools do besides serving (inspect's
//!   report, info's table, .npy files, the `bench` load generator); the
//!   binary only parses flags and dispatches.
//! - [`proto`]: the generated wire contract (`proto/minibatch/v1/minibatch.proto`).
pub mod access;
pub mod analyze;
pub mod attach;
pub mod background;
pub mod batch;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod device;
pub mod dtype;
pub mod error;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod order;
pub mod routes;
pub mod server;
pub mod service;
pub mod status;
pub mod store;

/// Generated from `proto/minibatch/v1/minibatch.proto` at build time.
pub mod proto {
    pub use tensor_chunks::proto::*;
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
