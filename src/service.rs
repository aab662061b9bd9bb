//! The tonic `BatchService`: requests in, status codes out, nothing else.
//! Which examples (order), how they are encoded (wire) and where they live
//! (store) are decided elsewhere; every error becomes a status in one place,
//! `impl From<ServeError> for Status`.
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::OnceCell;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::analyze::DatasetStats;
use crate::memory::PinState;
use crate::metrics::Metrics;
use crate::order::{OrderError, OrderSpec, PermCache, Plan};
use crate::proto;
use crate::store::{DType, Dataset, Set};
use crate::wire::{self, Conversion, TensorMessage};

/// Limits a client can read from GetInfo.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest minibatch (examples) one request may ask for. Bounds the
    /// memory one stream holds: a gathered or converted minibatch is built
    /// whole before it is chunked.
    pub max_batch_size: usize,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
    /// Largest `data` field in one TensorChunk.
    pub chunk_bytes: usize,
}

/// Default largest minibatch: 16,384 MNIST images are 51 MB as float32,
/// a bound on what one shuffled stream holds at once.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 16_384;
/// gRPC's default message limit, which stock clients enforce.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            chunk_bytes: wire::DEFAULT_CHUNK_BYTES,
        }
    }
}

/// Longest part of a client-supplied name repeated in an error message.
pub const MAX_ECHOED_NAME: usize = 64;

/// Everything that can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("unknown set {name:?}; this dataset has {available}")]
    UnknownSet { name: String, available: String },
    #[error("{0}")]
    Order(#[from] OrderError),
    #[error("start {start} is past the end: this order has {batches} minibatches")]
    StartPastEnd { start: u64, batches: u64 },
    #[error("{tensor} is {from}; cannot send it as {to}: {why}")]
    Conversion {
        tensor: String,
        from: DType,
        to: DType,
        why: String,
    },
    #[error("unknown dtype value {0} in request")]
    BadDType(i32),
    #[error("dataset statistics are unavailable: {0}")]
    Stats(String),
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        let msg = e.to_string();
        match e {
            ServeError::UnknownSet { .. } => Status::not_found(msg),
            ServeError::Order(OrderError::PastEnd { .. }) | ServeError::StartPastEnd { .. } => {
                Status::out_of_range(msg)
            }
            ServeError::Order(_) | ServeError::BadDType(_) => Status::invalid_argument(msg),
            ServeError::Conversion { .. } => Status::failed_precondition(msg),
            ServeError::Stats(_) => Status::internal(msg),
        }
    }
}

/// State shared by every request.
pub struct Shared {
    pub dataset: Arc<Dataset>,
    /// Computed once, in the background from start-up (see `analyze`).
    pub stats: OnceCell<Arc<DatasetStats>>,
    pub perms: PermCache,
    /// Per-row CRC-32Cs of every x tensor (set name → table), filled in the
    /// background after start-up; until then chunk CRCs are computed.
    pub row_crcs: std::sync::OnceLock<Vec<(String, Arc<crate::crc::RowCrcs>)>>,
    /// x tensors in narrower wire dtypes, built on first demand.
    pub mirrors: crate::mirror::Mirrors,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(dataset: Arc<Dataset>, limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics
            .dataset_bytes
            .store(dataset.memory_bytes as u64, Ordering::Relaxed);
        let pinned = if dataset.pin == PinState::Pinned {
            dataset.memory_bytes as u64
        } else {
            0
        };
        metrics.pinned_bytes.store(pinned, Ordering::Relaxed);
        Arc::new(Self {
            dataset,
            stats: OnceCell::new(),
            perms: PermCache::default(),
            row_crcs: std::sync::OnceLock::new(),
            mirrors: Default::default(),
            limits,
            metrics,
        })
    }

    /// Computes the per-row CRC tables (blocking; run it off the async threads).
    pub fn compute_row_crcs(&self) {
        let t0 = Instant::now();
        let v = self
            .dataset
            .sets
            .iter()
            .map(|s| (s.name.clone(), Arc::new(crate::crc::RowCrcs::new(&s.x))))
            .collect();
        if self.row_crcs.set(v).is_ok() {
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "row CRCs ready");
        }
    }

    /// The per-row CRCs of `set`'s tensor `name`, once computed (x only:
    /// labels are a few bytes per row, cheaper to checksum directly).
    pub fn row_crcs(&self, set: &str, name: &str) -> Option<Arc<crate::crc::RowCrcs>> {
        if name != "x" {
            return None;
        }
        self.row_crcs
            .get()?
            .iter()
            .find(|(s, _)| s == set)
            .map(|(_, r)| r.clone())
    }

    /// The dataset's statistics, computing them (off the async threads) if
    /// no one has yet.
    pub async fn stats(&self) -> Result<Arc<DatasetStats>, ServeError> {
        self.stats
            .get_or_try_init(|| async {
                let ds = self.dataset.clone();
                let t0 = Instant::now();
                let st = crate::background::run("stats", move || crate::analyze::dataset_stats(&ds))
                    .await
                    .map_err(ServeError::Stats)?;
                tracing::info!(ms = t0.elapsed().as_millis() as u64, fingerprint = %st.fingerprint, "dataset statistics ready");
                Ok(Arc::new(st))
            })
            .await
            .cloned()
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct BatchService {
    shared: Arc<Shared>,
}

impl BatchService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn set(&self, name: &str) -> Result<Set, ServeError> {
        self.shared
            .dataset
            .set(name)
            .cloned()
            .ok_or_else(|| ServeError::UnknownSet {
                // Echo at most a short prefix: error text travels in a header,
                // and a huge hostile name must not make the status undeliverable.
                name: name.chars().take(MAX_ECHOED_NAME).collect(),
                available: self
                    .shared
                    .dataset
                    .sets
                    .iter()
                    .map(|s| format!("{:?}", s.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    async fn conversions(
        &self,
        set: &Set,
        x: i32,
        y: i32,
    ) -> Result<(Conversion, Conversion), ServeError> {
        let want = |v: i32| -> Result<Option<DType>, ServeError> {
            let d = proto::Dtype::try_from(v).map_err(|_| ServeError::BadDType(v))?;
            Ok(wire::dtype_from_proto(d))
        };
        let (wx, wy) = (want(x)?, want(y)?);
        let mut out = [Conversion::identity(&set.x), Conversion::identity(&set.y)];
        for (i, (name, t, w)) in [("x", &set.x, wx), ("y", &set.y, wy)]
            .into_iter()
            .enumerate()
        {
            let Some(to) = w.filter(|&to| to != t.dtype) else {
                continue;
            };
            let stats = self.shared.stats().await?;
            let st = stats
                .get(&set.name, name)
                .expect("stats cover every tensor");
            out[i] = wire::conversion(t, st, to).map_err(|why| ServeError::Conversion {
                tensor: format!("{}.{name}", set.name),
                from: t.dtype,
                to,
                why,
            })?;
        }
        Ok((out[0], out[1]))
    }

    fn plan(&self, set: &Set, size: u32, order: Option<proto::Order>) -> Result<Plan, ServeError> {
        let o = order.unwrap_or_default();
        let spec = OrderSpec {
            shuffle: o.shuffle,
            seed: o.seed,
            epoch: o.epoch,
            rank: o.rank,
            world_size: o.world_size,
            drop_last: o.drop_last,
        };
        Ok(Plan::new(
            set.examples(),
            size as usize,
            self.shared.limits.max_batch_size,
            &spec,
            &self.shared.perms,
        )?)
    }

    fn finish(
        &self,
        method: &'static str,
        t0: Instant,
        r: Result<BatchStream, ServeError>,
    ) -> Result<Response<BatchStream>, Status> {
        match r {
            Ok(s) => Ok(Response::new(s)),
            Err(e) => {
                let st = Status::from(e);
                tracing::debug!(method, code = ?st.code(), message = st.message(), "request refused");
                self.shared.metrics.request(method, st.code(), t0.elapsed());
                Err(st)
            }
        }
    }
}

/// The [`StreamSpec`] of a GetBatch or StreamBatches request (the fields
/// both messages have, under the same names).
macro_rules! stream_spec {
    ($r:expr) => {
        StreamSpec {
            set: &$r.set,
            size: $r.size,
            order: $r.order,
            x_dtype: $r.x_dtype,
            y_dtype: $r.y_dtype,
            with_indices: $r.with_indices,
            max_chunk_bytes: $r.max_chunk_bytes,
        }
    };
}

#[tonic::async_trait]
impl proto::batch_service_server::BatchService for BatchService {
    async fn get_info(
        &self,
        _req: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::DatasetInfo>, Status> {
        let t0 = Instant::now();
        let stats = self.shared.stats().await.map_err(Status::from)?;
        let ds = &self.shared.dataset;
        let tinfo = |set: &str, name: &str, t: &crate::store::Tensor| {
            let st = stats.get(set, name).expect("stats cover every tensor");
            proto::TensorInfo {
                dtype: wire::dtype_to_proto(t.dtype) as i32,
                shape: t.shape[1..].iter().map(|&d| d as u64).collect(),
                sha256: st.sha256.clone(),
                wire_dtypes: wire::wire_dtypes(t, st)
                    .into_iter()
                    .map(|d| wire::dtype_to_proto(d) as i32)
                    .collect(),
                scale_divisor: st.uint8_divisor.unwrap_or(0),
            }
        };
        let sets = ds
            .sets
            .iter()
            .map(|s| proto::SetInfo {
                name: s.name.clone(),
                examples: s.examples() as u64,
                x: Some(tinfo(&s.name, "x", &s.x)),
                y: Some(tinfo(&s.name, "y", &s.y)),
                classes: stats
                    .get(&s.name, "y")
                    .and_then(|st| st.histogram.as_ref())
                    .map(|h| h.keys().copied().collect())
                    .unwrap_or_default(),
            })
            .collect();
        let source = std::path::Path::new(&ds.source)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| ds.source.clone());
        let l = self.shared.limits;
        let info = proto::DatasetInfo {
            source,
            format: ds.format.name().into(),
            fingerprint: stats.fingerprint.clone(),
            sets,
            memory_bytes: ds.memory_bytes as u64,
            pinned: ds.pin == PinState::Pinned,
            server_version: env!("CARGO_PKG_VERSION").into(),
            limits: Some(proto::Limits {
                max_batch_size: l.max_batch_size as u32,
                max_message_bytes: l.max_message_bytes as u32,
                chunk_bytes: l.chunk_bytes as u32,
            }),
        };
        self.shared
            .metrics
            .request("GetInfo", tonic::Code::Ok, t0.elapsed());
        Ok(Response::new(info))
    }

    type GetBatchStream = BatchStream;

    async fn get_batch(
        &self,
        req: Request<proto::GetBatchRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let r = req.into_inner();
        let spec = stream_spec!(r);
        self.open("GetBatch", spec, |plan| {
            plan.batch(r.index)?;
            Ok(r.index..r.index + 1)
        })
        .await
    }

    type StreamBatchesStream = BatchStream;

    async fn stream_batches(
        &self,
        req: Request<proto::StreamBatchesRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let r = req.into_inner();
        let spec = stream_spec!(r);
        self.open("StreamBatches", spec, |plan| {
            let batches = plan.batches();
            if r.start >= batches && !(r.start == 0 && batches == 0) {
                return Err(ServeError::StartPastEnd {
                    start: r.start,
                    batches,
                });
            }
            let end = if r.count == 0 {
                batches
            } else {
                r.start.saturating_add(r.count).min(batches)
            };
            Ok(r.start..end)
        })
        .await
    }
}

/// What GetBatch and StreamBatches share in their requests.
struct StreamSpec<'a> {
    set: &'a str,
    size: u32,
    order: Option<proto::Order>,
    x_dtype: i32,
    y_dtype: i32,
    with_indices: bool,
    max_chunk_bytes: u32,
}

impl BatchService {
    /// Validates a streaming request and opens its response stream over the
    /// minibatches `range` picks from the resolved order.
    async fn open(
        &self,
        method: &'static str,
        spec: StreamSpec<'_>,
        range: impl FnOnce(&Plan) -> Result<std::ops::Range<u64>, ServeError>,
    ) -> Result<Response<BatchStream>, Status> {
        let t0 = Instant::now();
        let result = async {
            let set = self.set(spec.set)?;
            let plan = self.plan(&set, spec.size, spec.order)?;
            let range = range(&plan)?;
            let conv = self.conversions(&set, spec.x_dtype, spec.y_dtype).await?;
            let l = self.shared.limits;
            let chunk_bytes = match spec.max_chunk_bytes as usize {
                0 => l.chunk_bytes,
                asked => asked.min(l.max_message_bytes - wire::MESSAGE_OVERHEAD),
            };
            let enc = Encoding {
                conv,
                with_indices: spec.with_indices,
                chunk_bytes,
            };
            Ok(BatchStream::new(
                method,
                self.shared.clone(),
                set,
                plan,
                enc,
                range,
                t0,
            ))
        }
        .await;
        self.finish(method, t0, result)
    }
}

/// How a stream's tensors go on the wire.
struct Encoding {
    conv: (Conversion, Conversion),
    with_indices: bool,
    /// Largest `data` per message for this stream.
    chunk_bytes: usize,
}

/// The response stream of GetBatch and StreamBatches. It builds one
/// minibatch only when the previous one has been taken by the transport, so
/// a slow client holds at most one minibatch (plus HTTP/2 windows) in server
/// memory, never an epoch.
pub struct BatchStream {
    method: &'static str,
    shared: Arc<Shared>,
    set: Set,
    plan: Plan,
    enc: Encoding,
    next: u64,
    end: u64,
    pending: VecDeque<proto::TensorChunk>,
    started: Instant,
    done: bool,
}

impl BatchStream {
    fn new(
        method: &'static str,
        shared: Arc<Shared>,
        set: Set,
        plan: Plan,
        enc: Encoding,
        range: std::ops::Range<u64>,
        started: Instant,
    ) -> Self {
        shared
            .metrics
            .active_streams
            .fetch_add(1, Ordering::Relaxed);
        Self {
            method,
            shared,
            set,
            plan,
            enc,
            next: range.start,
            end: range.end,
            pending: VecDeque::new(),
            started,
            done: false,
        }
    }

    /// Queues the messages of minibatch `index`.
    fn build(&mut self, index: u64) {
        let sel = self
            .plan
            .batch(index)
            .expect("index validated against the plan");
        let n = sel.len() as u64;
        let chunk = self.enc.chunk_bytes;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let shape = |t: &crate::store::Tensor| {
            let mut s = vec![n];
            s.extend(t.shape[1..].iter().map(|&d| d as u64));
            s
        };
        for (name, t, conv) in [
            ("x", &self.set.x, self.enc.conv.0),
            ("y", &self.set.y, self.enc.conv.1),
        ] {
            let mirror = (name == "x" && crate::mirror::Mirrors::wanted(&conv))
                .then(|| {
                    self.shared.mirrors.get_or_start(
                        &self.set.name,
                        t,
                        conv,
                        self.shared.dataset.pin == PinState::Pinned,
                        &self.shared.metrics,
                    )
                })
                .flatten();
            let data = match &mirror {
                Some(m) => wire::tensor_bytes(&m.tensor, &sel, &Conversion::identity(&m.tensor)),
                None => wire::tensor_bytes(t, &sel, &conv),
            };
            bytes += data.len() as u64;
            let last = name == "y" && !self.enc.with_indices;
            let divisor = if conv.to == DType::U8 {
                conv.divisor
            } else {
                0
            };
            let m = TensorMessage {
                index,
                name,
                dtype: conv.to,
                shape: shape(t),
                divisor,
                data,
            };
            let row_crcs = match &mirror {
                Some(_) => None,
                None => (conv.to == conv.from)
                    .then(|| self.shared.row_crcs(&self.set.name, name))
                    .flatten(),
            };
            let rows = mirror.as_ref().map(|m| &m.crcs).or(row_crcs.as_deref());
            wire::chunk_with(m, chunk, last, &mut out, rows.map(|rc| (rc, &sel)));
        }
        if self.enc.with_indices {
            let idx: Vec<u8> = sel
                .indices()
                .iter()
                .flat_map(|&i| (i as i64).to_le_bytes())
                .collect();
            let m = TensorMessage {
                index,
                name: "indices",
                dtype: DType::I64,
                shape: vec![n],
                divisor: 0,
                data: idx.into(),
            };
            wire::chunk(m, chunk, true, &mut out);
        }
        self.shared.metrics.minibatch(self.method, bytes);
        self.pending.extend(out);
    }
}

impl Stream for BatchStream {
    type Item = Result<proto::TensorChunk, Status>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.pending.is_empty() && this.next < this.end {
            let i = this.next;
            this.next += 1;
            this.build(i);
        }
        match this.pending.pop_front() {
            Some(m) => Poll::Ready(Some(Ok(m))),
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        let m = &self.shared.metrics;
        m.active_streams.fetch_sub(1, Ordering::Relaxed);
        // A stream dropped before its end means the client left (or the
        // server shut down past its grace period).
        let code = if self.done {
            tonic::Code::Ok
        } else {
            tonic::Code::Cancelled
        };
        m.request(self.method, code, self.started.elapsed());
    }
}
