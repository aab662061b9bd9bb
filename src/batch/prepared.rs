//! The dataset made ready to serve: what the server derives from each
//! resident tensor once (per-row CRCs, narrow-dtype mirrors) and from the
//! whole dataset (statistics, shuffles), plus the limits and the memory
//! budget every request is held to. One per server; requests share it.
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::budget::{self, Budget};
use super::convert::Conversion;
use super::crc::RowCrcs;
use super::gather::Rows;
use super::mirror::{Mirror, Mirrors};
use crate::analyze::DatasetStats;
use crate::memory::PinState;
use crate::metrics::Metrics;
use crate::order::PermCache;
use crate::store::{Dataset, Tensor};

/// Limits a client can read from GetInfo, and the budget behind them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest minibatch (examples) one request may ask for.
    pub max_batch_size: usize,
    /// Largest gRPC message sent.
    pub max_message_bytes: usize,
    /// Default largest `data` field in one TensorChunk.
    pub chunk_bytes: usize,
    /// Bytes all requests together may hold in gathered or converted
    /// chunks and shuffled minibatches' index lists ([`budget`]).
    pub budget_bytes: usize,
    /// Longest wait for budget before a stream is refused.
    pub budget_wait: Duration,
    /// Age at which a lease counts as stalled while others wait for
    /// budget: its connection is closed ([`budget`]).
    pub budget_stall: Duration,
    /// How long a request message may take to arrive after its headers.
    pub request_timeout: Duration,
}

/// Default largest minibatch: 16,384 MNIST images are 51 MB as float32.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 16_384;
/// gRPC's default message limit, which stock clients enforce.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Default largest `data` field: about 1 MiB is where both the Rust and the
/// Python gRPC clients measured fastest here (BENCHMARKS.md), and it keeps
/// each message far below the 4 MiB default limit of stock clients.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default time for a request message to arrive after its headers: real
/// clients send it in the same packet; a body that trickles in longer is a
/// client holding a stream (and its buffer) open.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest `data` field a request may ask for. Each message costs the
/// server a header, a CRC and an HTTP/2 frame: an audit's 1-byte chunks
/// turned one 1,000-image minibatch into 3 million messages. 64 KiB keeps
/// per-message work under a few percent of the copy.
pub const MIN_CHUNK_BYTES: usize = 64 << 10;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            budget_bytes: budget::DEFAULT_BUDGET_BYTES,
            budget_wait: budget::DEFAULT_BUDGET_WAIT,
            budget_stall: budget::DEFAULT_STALL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl Limits {
    /// Largest `data` field one message may carry: what fits the message
    /// limit, and at most half the memory budget, so that no single stream
    /// can need all of it.
    pub fn max_chunk_bytes(&self) -> usize {
        (self.max_message_bytes - super::frame::MESSAGE_OVERHEAD).min(self.budget_bytes / 2)
    }

    /// The chunk size for a request asking for `asked` (0: the server's
    /// default): within [`MIN_CHUNK_BYTES`] (or the server's own, smaller,
    /// default) and [`Limits::max_chunk_bytes`].
    pub fn chunk_bytes_for(&self, asked: u32) -> usize {
        let asked = match asked as usize {
            0 => self.chunk_bytes,
            asked => asked.max(MIN_CHUNK_BYTES.min(self.chunk_bytes)),
        };
        asked.min(self.max_chunk_bytes())
    }

    /// Budget one connection's chunks may hold at once: half of it, so no
    /// single client fills the budget (eviction then frees what a stalled
    /// one holds) and still at least its largest chunk.
    pub fn connection_share(&self) -> usize {
        (self.budget_bytes / 2).max(self.max_chunk_bytes())
    }

    /// Budget one stream may need at once: a chunk and, shuffled, the
    /// index list of a minibatch. A smaller budget could stall a lone stream.
    pub fn stream_bytes(&self) -> usize {
        self.max_chunk_bytes() + self.max_batch_size * std::mem::size_of::<usize>()
    }
}

/// Per-row CRCs are kept for tensors with rows at least this long: below
/// it (labels: 8 bytes a row) checksumming the bytes is cheaper than
/// folding one CRC per row (4 table lookups each).
const ROW_CRC_MIN_ROW_BYTES: usize = 64;

/// One resident tensor and what is derived from it.
pub struct PreparedTensor {
    /// `x` or `y`, its name on the wire.
    pub name: &'static str,
    pub tensor: Tensor,
    /// Filled in the background after start-up; until then chunk CRCs are
    /// computed from the bytes.
    row_crcs: OnceLock<Arc<RowCrcs>>,
    mirrors: Mirrors,
}

/// Where a stream reads one tensor's rows from, and how to checksum them.
pub struct Source {
    pub rows: Rows,
    /// Per-row CRCs of exactly the bytes `rows` produces, when known.
    pub crcs: Option<Arc<RowCrcs>>,
}

impl PreparedTensor {
    fn new(name: &'static str, tensor: Tensor) -> Self {
        Self {
            name,
            tensor,
            row_crcs: OnceLock::new(),
            mirrors: Mirrors::default(),
        }
    }

    /// The source of this tensor's rows as `conv`: a ready mirror in that
    /// dtype (starting its build on first demand), else the tensor itself.
    fn source(&self, set: &str, conv: Conversion, p: &Prepared) -> Source {
        if Mirrors::wanted(&conv) {
            // Named only when a build starts: this runs per minibatch.
            let label = || format!("{set}.{}", self.name);
            let pin = p.dataset.pin == PinState::Pinned;
            let backing = p.dataset.backing();
            if let Some(m) =
                self.mirrors
                    .get_or_start(label, &self.tensor, conv, pin, backing, &p.metrics)
            {
                return Source {
                    rows: Rows::Tensor {
                        tensor: m.tensor.clone(),
                        conv: Conversion::identity(&m.tensor),
                    },
                    crcs: Some(m.crcs.clone()),
                };
            }
        }
        Source {
            crcs: conv
                .is_identity()
                .then(|| self.row_crcs.get().cloned())
                .flatten(),
            rows: Rows::Tensor {
                tensor: self.tensor.clone(),
                conv,
            },
        }
    }
}

impl PreparedTensor {
    /// The mirror of this tensor as `conv` (see [`Mirrors::ready`]).
    pub async fn mirror(
        &self,
        set: &str,
        conv: Conversion,
        p: &Prepared,
    ) -> Result<Arc<Mirror>, String> {
        let label = || format!("{set}.{}", self.name);
        let pin = p.dataset.pin == PinState::Pinned;
        self.mirrors
            .ready(
                label,
                &self.tensor,
                conv,
                pin,
                p.dataset.backing(),
                &p.metrics,
            )
            .await
    }
}

/// One set: its name and its two tensors.
pub struct PreparedSet {
    pub name: String,
    pub x: PreparedTensor,
    pub y: PreparedTensor,
}

impl PreparedSet {
    pub fn examples(&self) -> usize {
        self.x.tensor.examples()
    }

    pub fn tensors(&self) -> [&PreparedTensor; 2] {
        [&self.x, &self.y]
    }

    /// Sources of x and y as `conv.0` and `conv.1`.
    pub fn sources(&self, conv: (Conversion, Conversion), p: &Prepared) -> [Source; 2] {
        [
            self.x.source(&self.name, conv.0, p),
            self.y.source(&self.name, conv.1, p),
        ]
    }
}

/// The whole prepared dataset (see the module docs).
pub struct Prepared {
    /// Its name on this daemon (see [`crate::catalog`]).
    pub name: String,
    pub dataset: Arc<Dataset>,
    /// Its copies in device memory (`--device`), one per device.
    pub devices: Vec<Arc<crate::device::Copy>>,
    pub sets: Vec<PreparedSet>,
    /// Computed once, in the background from start-up (see `analyze`).
    stats: OnceCell<Arc<DatasetStats>>,
    pub perms: PermCache,
    pub limits: Limits,
    pub budget: Budget,
    pub metrics: Arc<Metrics>,
}

impl Prepared {
    /// Prepares `dataset` as `name`, held to `limits` and sharing the
    /// daemon's `budget` with every other dataset.
    pub fn new(
        name: String,
        dataset: Arc<Dataset>,
        devices: Vec<Arc<crate::device::Copy>>,
        limits: Limits,
        budget: Budget,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        metrics.dataset(
            &name,
            dataset.memory_bytes as u64,
            dataset.pin == PinState::Pinned,
        );
        let sets = dataset
            .sets
            .iter()
            .map(|s| PreparedSet {
                name: s.name.clone(),
                x: PreparedTensor::new("x", s.x.clone()),
                y: PreparedTensor::new("y", s.y.clone()),
            })
            .collect();
        Arc::new(Self {
            name,
            dataset,
            devices,
            sets,
            stats: OnceCell::new(),
            perms: PermCache::default(),
            limits,
            budget,
            metrics,
        })
    }

    pub fn set(&self, name: &str) -> Option<&PreparedSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// Computes the per-row CRC tables (blocking: run it off the async threads).
    pub fn compute_row_crcs(&self) {
        let t0 = Instant::now();
        for t in self.sets.iter().flat_map(|s| s.tensors()) {
            if t.tensor.row_bytes() >= ROW_CRC_MIN_ROW_BYTES {
                let _ = t.row_crcs.set(Arc::new(RowCrcs::new(&t.tensor)));
            }
        }
        tracing::info!(ms = t0.elapsed().as_millis() as u64, "row CRCs ready");
    }

    /// The statistics if they are computed already (the status page
    /// shows what is known and never waits).
    pub fn stats_now(&self) -> Option<Arc<DatasetStats>> {
        self.stats.get().cloned()
    }

    /// The dataset's statistics, computing them (off the async threads) if
    /// no one has yet.
    pub async fn stats(&self) -> Result<Arc<DatasetStats>, String> {
        self.stats
            .get_or_try_init(|| async {
                let ds = self.dataset.clone();
                let t0 = Instant::now();
                let st = crate::background::run("stats", move || {
                    crate::analyze::dataset_stats(&ds)
                })
                .await?;
                tracing::info!(ms = t0.elapsed().as_millis() as u64, fingerprint = %st.fingerprint, "dataset statistics ready");
                Ok(Arc::new(st))
            })
            .await
            .cloned()
    }
}
