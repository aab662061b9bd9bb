//! BatchService's three requests, validated against the prepared dataset
//! they name (of the daemon's [`Catalog`]) and answered: GetInfo with a
//! description, GetBatch and StreamBatches with a [`BatchStream`]. Which examples (order), how they are encoded
//! (batch) and how they travel (routes) are decided elsewhere; errors are
//! [`ServeError`]s, mapped to status codes in one place (`error`).
use std::sync::Arc;
use std::time::Instant;

use crate::batch::budget::Holder;
use crate::batch::convert::{self, Conversion};
use crate::batch::prepared::{Prepared, PreparedSet};
use crate::batch::stream::{BatchStream, Encoding, Span};
use crate::catalog::Catalog;
use crate::memory::PinState;
use crate::order::{OrderSpec, Plan};
use crate::proto;
use crate::store::DType;

pub use crate::batch::prepared::{
    Limits, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REQUEST_TIMEOUT, MIN_CHUNK_BYTES,
};
pub use crate::error::{ServeError, MAX_ECHOED_NAME};

/// The fields GetBatch and StreamBatches requests share (same names).
struct StreamSpec<'a> {
    dataset: &'a str,
    set: &'a str,
    size: u32,
    order: Option<proto::Order>,
    x_dtype: i32,
    y_dtype: i32,
    with_indices: bool,
    max_chunk_bytes: u32,
}

/// The [`StreamSpec`] of a GetBatch or StreamBatches request.
macro_rules! stream_spec {
    ($r:expr) => {
        StreamSpec {
            dataset: &$r.dataset,
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

/// The service over the daemon's prepared datasets (cheap to clone).
#[derive(Clone)]
pub struct BatchService {
    catalog: Arc<Catalog>,
}

impl BatchService {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// GetInfo: the named dataset (or the only one) and the list of all.
    pub async fn info(&self, r: proto::GetInfoRequest) -> Result<proto::DatasetInfo, ServeError> {
        let t0 = Instant::now();
        let res = async {
            let mut datasets = Vec::with_capacity(self.catalog.all().len());
            for p in self.catalog.all() {
                datasets.push(describe(p).await?);
            }
            // With several datasets and none named, the per-dataset fields
            // stay empty: which one would be a guess.
            let mut info = match (r.dataset.as_str(), self.catalog.get(&r.dataset)) {
                ("", Err(ServeError::DatasetNeeded { .. })) => proto::DatasetInfo::default(),
                (_, Ok(p)) => datasets
                    .iter()
                    .find(|d| d.name == p.name)
                    .cloned()
                    .expect("every dataset is listed"),
                (_, Err(e)) => return Err(e),
            };
            let l = self.catalog.limits;
            info.server_version = env!("CARGO_PKG_VERSION").into();
            info.limits = Some(proto::Limits {
                max_batch_size: l.max_batch_size as u32,
                max_message_bytes: l.max_message_bytes as u32,
                chunk_bytes: l.chunk_bytes as u32,
            });
            info.datasets = datasets;
            Ok(info)
        }
        .await;
        self.record("GetInfo", t0, res.as_ref().err());
        res
    }

    /// GetBatch: minibatch `index` of the request's order, for a stream of
    /// connection `holder`.
    pub async fn get_batch(
        &self,
        r: proto::GetBatchRequest,
        holder: Option<Arc<Holder>>,
    ) -> Result<BatchStream, ServeError> {
        let index = r.index;
        self.open("GetBatch", stream_spec!(r), holder, |plan| {
            plan.batch(index)?;
            Ok(index..index + 1)
        })
        .await
    }

    /// StreamBatches: minibatches `start .. start+count` (count 0: to the
    /// end of the epoch).
    pub async fn stream_batches(
        &self,
        r: proto::StreamBatchesRequest,
        holder: Option<Arc<Holder>>,
    ) -> Result<BatchStream, ServeError> {
        let (start, count) = (r.start, r.count);
        self.open("StreamBatches", stream_spec!(r), holder, |plan| {
            let batches = plan.batches();
            if start >= batches && !(start == 0 && batches == 0) {
                return Err(ServeError::StartPastEnd { start, batches });
            }
            let end = match count {
                0 => batches,
                n => start.saturating_add(n).min(batches),
            };
            Ok(start..end)
        })
        .await
    }

    /// Validates a streaming request and opens its response stream over the
    /// minibatches `range` picks from the resolved order.
    async fn open(
        &self,
        method: &'static str,
        spec: StreamSpec<'_>,
        holder: Option<Arc<Holder>>,
        range: impl FnOnce(&Plan) -> Result<std::ops::Range<u64>, ServeError>,
    ) -> Result<BatchStream, ServeError> {
        let t0 = Instant::now();
        let r = async {
            let p = self.catalog.get(spec.dataset)?;
            let set = set_index(p, spec.set)?;
            let plan = plan(p, &p.sets[set], spec.size, spec.order)?;
            let range = range(&plan)?;
            let conv = conversions(p, &p.sets[set], spec.x_dtype, spec.y_dtype).await?;
            let enc = Encoding {
                conv,
                with_indices: spec.with_indices,
                chunk_bytes: p.limits.chunk_bytes_for(spec.max_chunk_bytes),
            };
            let span = Span { set, plan, range };
            Ok(BatchStream::new(method, p.clone(), span, enc, holder, t0))
        }
        .await;
        if let Err(e) = &r {
            self.record(method, t0, Some(e));
        }
        r
    }

    /// Counts a refused request (an opened stream counts itself when it
    /// ends) or an answered GetInfo. The transport calls it too, for
    /// requests it refused before they reached the service.
    pub fn record(&self, method: &str, t0: Instant, e: Option<&ServeError>) {
        let code = match e {
            None => tonic::Code::Ok,
            Some(e) => {
                let st = tonic::Status::from(e.clone());
                tracing::debug!(method, code = ?st.code(), message = st.message(), "request refused");
                st.code()
            }
        };
        self.catalog.metrics.request(method, code, t0.elapsed());
    }
}

/// The index of set `name` in `p`.
pub fn set_index(p: &Prepared, name: &str) -> Result<usize, ServeError> {
    let sets = &p.sets;
    sets.iter()
        .position(|s| s.name == name)
        .ok_or_else(|| ServeError::unknown_set(name, sets.iter().map(|s| s.name.as_str())))
}

/// The resolved order of a request for minibatches of `size` from `set`.
pub fn plan(
    p: &Prepared,
    set: &PreparedSet,
    size: u32,
    order: Option<proto::Order>,
) -> Result<Plan, ServeError> {
    let o = order.unwrap_or_default();
    let spec = OrderSpec {
        shuffle: o.shuffle,
        seed: o.seed,
        epoch: o.epoch,
        rank: o.rank,
        world_size: o.world_size,
        drop_last: o.drop_last,
        offset: o.offset,
    };
    Ok(Plan::new(
        set.examples(),
        size as usize,
        p.limits.max_batch_size,
        &spec,
        &p.perms,
    )?)
}

/// How x and y of `set` go on the wire for the requested dtypes (0: as stored).
pub async fn conversions(
    p: &Prepared,
    set: &PreparedSet,
    x: i32,
    y: i32,
) -> Result<(Conversion, Conversion), ServeError> {
    let mut out = [
        Conversion::identity(&set.x.tensor),
        Conversion::identity(&set.y.tensor),
    ];
    for (o, (t, asked)) in out.iter_mut().zip(set.tensors().into_iter().zip([x, y])) {
        let d = proto::Dtype::try_from(asked).map_err(|_| ServeError::BadDType(asked))?;
        let Some(to) = DType::from_proto(d).filter(|&to| to != t.tensor.dtype) else {
            continue;
        };
        let stats = p.stats().await.map_err(ServeError::Stats)?;
        let st = stats
            .get(&set.name, t.name)
            .expect("stats cover every tensor");
        *o = convert::conversion(&t.tensor, st, to).map_err(|why| ServeError::Conversion {
            tensor: format!("{}.{}", set.name, t.name),
            from: t.tensor.dtype,
            to,
            why,
        })?;
    }
    Ok((out[0], out[1]))
}

/// One dataset as GetInfo describes it (without the daemon-wide fields:
/// version, limits, the list of datasets).
pub async fn describe(p: &Prepared) -> Result<proto::DatasetInfo, ServeError> {
    let stats = p.stats().await.map_err(ServeError::Stats)?;
    let ds = &p.dataset;
    let sets = p
        .sets
        .iter()
        .map(|s| {
            let [x, y] = s.tensors().map(|t| {
                let st = stats
                    .get(&s.name, t.name)
                    .expect("stats cover every tensor");
                proto::TensorInfo {
                    dtype: t.tensor.dtype.to_proto() as i32,
                    shape: t.tensor.shape[1..].iter().map(|&d| d as u64).collect(),
                    sha256: st.sha256.clone(),
                    wire_dtypes: convert::wire_dtypes(&t.tensor, st)
                        .into_iter()
                        .map(|d| d.to_proto() as i32)
                        .collect(),
                    scale_divisor: st.uint8_divisor.unwrap_or(0),
                }
            });
            proto::SetInfo {
                name: s.name.clone(),
                examples: s.examples() as u64,
                x: Some(x),
                y: Some(y),
                classes: stats
                    .get(&s.name, "y")
                    .and_then(|st| st.histogram.as_ref())
                    .map(|h| h.keys().copied().collect())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let source = std::path::Path::new(&ds.source)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| ds.source.clone());
    Ok(proto::DatasetInfo {
        name: p.name.clone(),
        source,
        format: ds.format.name().into(),
        fingerprint: stats.fingerprint.clone(),
        sets,
        memory_bytes: ds.memory_bytes as u64,
        pinned: ds.pin == PinState::Pinned,
        devices: p
            .devices
            .iter()
            .map(|c| proto::DeviceInfo {
                uuid: c.device.uuid().into(),
                name: c.device.name().into(),
                bytes: c.bytes() as u64,
                backend: c.backend.into(),
            })
            .collect(),
        ..Default::default()
    })
}
