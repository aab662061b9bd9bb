//! What the daemon is doing, for people: the registry of open streams and
//! attached processes ([`Board`]), its JSON snapshot (`GET /status.json`
//! on the metrics address), the status page (`GET /`, [`page`]) and the
//! minibatch viewer (`GET /minibatch.png`, [`png`]), all answered by
//! [`web`] on the metrics listener.
//!
//! Everything is bounded: at most [`MAX_LISTED_STREAMS`] open streams are
//! listed (more are counted, not listed), the last [`MAX_FINISHED_STREAMS`]
//! finished ones are kept, and no stream adds a metric label (Prometheus
//! series stay per method, as before).
//!
//! Several datasets per daemon ([`crate::catalog`]): the snapshot lists
//! `datasets`, each stream names its dataset, and the viewer takes
//! `dataset=` (empty: the only one), resolved as requests resolve theirs.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::access::BearerAuth;
use crate::batch::prepared::Prepared;
use crate::catalog::Catalog;
use crate::memory::PinState;
use crate::metrics::Metrics;
use crate::proto;

pub mod page;
pub mod png;
pub mod web;

/// Open streams listed at once. A replica serves a few dozen trainers
/// (a 64-rank job with two prefetching streams each is 128); 256 entries
/// are ~100 KB of JSON, still one fetch every 2 s for the page. Streams
/// beyond it are served as usual and counted in `streams_unlisted`.
pub const MAX_LISTED_STREAMS: usize = 256;

/// Finished streams kept (newest first) so that a short GetBatch can be
/// seen after it ended; the oldest is dropped when a newer one finishes.
pub const MAX_FINISHED_STREAMS: usize = 32;

/// Longest trainer id kept (the `x-trainer-id` header, else `user-agent`):
/// enough for "grpc-python/1.76.0 grpc-c/51.0.0 (linux; chttp2)", short
/// enough that 256 of them stay small.
pub const MAX_TRAINER_CHARS: usize = 64;

/// Throughput samples kept; one is taken at most every
/// [`SAMPLE_EVERY`] when someone asks, so rates cover the last few seconds
/// even with one viewer polling every 2 s.
const MAX_SAMPLES: usize = 16;
/// Least time between throughput samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Rates are measured over the newest sample at least this old.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The TCP peer's address, or "unix" for the Unix socket.
    pub addr: String,
    /// The peer's pid on a Unix socket (SO_PEERCRED), when known: absent
    /// for a peer in another PID namespace (another container).
    pub pid: Option<u32>,
}

impl Peer {
    /// A TCP peer (`None`: gone before it could be asked).
    pub fn tcp(addr: Option<std::net::SocketAddr>) -> Self {
        Self {
            addr: addr.map_or_else(|| "unknown".into(), |a| a.to_string()),
            pid: None,
        }
    }

    /// A peer on the Unix socket; pid 0 (another PID namespace) is unknown.
    pub fn unix(pid: Option<i32>) -> Self {
        Self {
            addr: "unix".into(),
            pid: pid.filter(|&p| p > 0).map(|p| p as u32),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "{} pid {pid}", self.addr),
            None => f.write_str(&self.addr),
        }
    }
}

/// A short printable id: control characters dropped, at most
/// [`MAX_TRAINER_CHARS`].
fn short(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TRAINER_CHARS)
        .collect()
}

/// Who sent a request: its connection's peer and the trainer id its
/// headers give (`x-trainer-id`, else `user-agent`).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub peer: Peer,
    pub trainer: String,
}

impl Caller {
    /// The caller of a request with `headers` on a connection with `peer`.
    pub fn of(peer: Option<&Peer>, headers: &::http::HeaderMap) -> Self {
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            peer: peer.cloned().unwrap_or_default(),
            trainer: short(h("x-trainer-id").or_else(|| h("user-agent")).unwrap_or("")),
        }
    }

    /// What a GetBatch or StreamBatches request asked for, for its listing.
    pub fn stream(
        &self,
        method: &'static str,
        set: &str,
        size: u32,
        order: Option<&proto::Order>,
    ) -> StreamRequest {
        StreamRequest {
            method,
            set: set.chars().take(crate::error::MAX_ECHOED_NAME).collect(),
            size,
            order: order.cloned().unwrap_or_default(),
            caller: self.clone(),
        }
    }
}

/// A stream's request, as listed (see [`Caller::stream`]).
#[derive(Debug, Clone)]
pub struct StreamRequest {
    pub method: &'static str,
    pub set: String,
    pub size: u32,
    pub order: proto::Order,
    pub caller: Caller,
}

/// One listed stream or attachment; the stream updates its counters.
#[derive(Debug)]
struct Entry {
    id: u64,
    dataset: String,
    req: StreamRequest,
    /// Minibatches `start..end` of the order (0..0 for an attachment).
    start: u64,
    end: u64,
    started: Instant,
    started_unix: f64,
    sent: AtomicU64,
    bytes: AtomicU64,
}

/// How a finished entry ended.
#[derive(Debug)]
struct Finished {
    entry: Arc<Entry>,
    outcome: String,
    seconds: f64,
}

#[derive(Debug, Default)]
struct Registry {
    open: BTreeMap<u64, Arc<Entry>>,
    /// Newest last.
    finished: VecDeque<Finished>,
    /// Open but not listed (the list was full when they opened).
    unlisted: u64,
    next_id: u64,
}

/// A stream's or attachment's place on the board: counts what it sends,
/// and moves to the finished list when dropped (or [`finish`](Self::finish)ed).
#[derive(Debug)]
pub struct Shown {
    reg: Arc<Mutex<Registry>>,
    /// `None` when the list was full.
    entry: Option<Arc<Entry>>,
    done: bool,
}

impl Shown {
    /// One more minibatch of `bytes` tensor bytes sent.
    pub fn sent(&self, bytes: u64) {
        if let Some(e) = &self.entry {
            e.sent.fetch_add(1, Ordering::Relaxed);
            e.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Ends the listing with `outcome` (a gRPC code name, or "detached").
    pub fn finish(&mut self, outcome: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut r = lock(&self.reg);
        match &self.entry {
            None => r.unlisted = r.unlisted.saturating_sub(1),
            Some(e) => {
                r.open.remove(&e.id);
                if r.finished.len() >= MAX_FINISHED_STREAMS {
                    r.finished.pop_front();
                }
                r.finished.push_back(Finished {
                    entry: e.clone(),
                    outcome: outcome.to_string(),
                    seconds: e.started.elapsed().as_secs_f64(),
                });
            }
        }
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.finish("Cancelled");
    }
}

/// A poisoned lock only means a panic elsewhere; the registry stays usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the server serves, given to the board once it runs.
struct Served {
    /// Weak, so the board (inside `Metrics`, which the catalog holds)
    /// keeps no dataset alive.
    catalog: Weak<Catalog>,
    /// The daemon's bearer token: `/`, `/status.json` and
    /// `/minibatch.png` require it too.
    auth: Option<BearerAuth>,
    /// Whether same-host processes can attach (`--uds`).
    uds: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    minibatches: u64,
    bytes: u64,
}

/// The status of one daemon (see the module docs); lives in [`Metrics`].
pub struct Board {
    reg: Arc<Mutex<Registry>>,
    served: OnceLock<Served>,
    samples: Mutex<VecDeque<Sample>>,
    started: Instant,
    started_unix: f64,
    /// PNG renders running at once (see [`png::RENDER_SLOTS`]).
    pub(crate) renders: Arc<tokio::sync::Semaphore>,
}

impl Default for Board {
    fn default() -> Self {
        let started = Instant::now();
        Self {
            reg: Default::default(),
            served: OnceLock::new(),
            samples: Mutex::new(VecDeque::from([Sample {
                at: started,
                minibatches: 0,
                bytes: 0,
            }])),
            started,
            started_unix: unix_now(),
            renders: Arc::new(tokio::sync::Semaphore::new(png::RENDER_SLOTS)),
        }
    }
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("served", &self.served.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Board {
    /// What the server serves: its `catalog`, its token, whether
    /// processes can attach. Until this is called the status endpoints
    /// answer 503 (so none is ever served without its token check); later
    /// calls are ignored.
    pub fn serve(&self, catalog: &Arc<Catalog>, auth: Option<BearerAuth>, uds: bool) {
        let _ = self.served.set(Served {
            catalog: Arc::downgrade(catalog),
            auth,
            uds,
        });
    }

    /// Whether the server has said what it serves (see [`Board::serve`]).
    pub fn is_serving(&self) -> bool {
        self.served.get().is_some()
    }

    /// The daemon's bearer token check, when it has one.
    pub(crate) fn auth(&self) -> Option<&BearerAuth> {
        self.served.get().and_then(|s| s.auth.as_ref())
    }

    /// The served datasets, while the server runs.
    pub(crate) fn catalog(&self) -> Option<Arc<Catalog>> {
        self.served.get().and_then(|s| s.catalog.upgrade())
    }

    /// Lists a stream over minibatches `range` of `dataset` (see
    /// [`crate::batch::stream::BatchStream::shown`]).
    pub fn open(&self, req: StreamRequest, dataset: &str, range: std::ops::Range<u64>) -> Shown {
        self.add(req, dataset.into(), range)
    }

    /// Lists a process attached to `dataset` (pid when known, the name
    /// its client gave) until the returned [`Shown`] drops.
    pub fn attached(&self, dataset: &str, pid: Option<i32>, client: &str) -> Shown {
        let caller = Caller {
            peer: Peer::unix(pid),
            trainer: short(client),
        };
        let req = StreamRequest {
            method: "Attach",
            set: String::new(),
            size: 0,
            order: Default::default(),
            caller,
        };
        self.add(req, dataset.into(), 0..0)
    }

    fn add(&self, req: StreamRequest, dataset: String, range: std::ops::Range<u64>) -> Shown {
        let mut r = lock(&self.reg);
        let entry = if r.open.len() < MAX_LISTED_STREAMS {
            let id = r.next_id;
            r.next_id += 1;
            let e = Arc::new(Entry {
                id,
                dataset,
                req,
                start: range.start,
                end: range.end,
                started: Instant::now(),
                started_unix: unix_now(),
                sent: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            });
            r.open.insert(id, e.clone());
            Some(e)
        } else {
            r.unlisted += 1;
            None
        };
        Shown {
            reg: self.reg.clone(),
            entry,
            done: false,
        }
    }

    /// Rates over the newest sample at least [`RATE_WINDOW`] old (or the
    /// oldest kept), from the daemon-wide counters `now`.
    fn rates(&self, now: Sample) -> (f64, f64, f64) {
        let mut s = lock(&self.samples);
        let base = s
            .iter()
            .rev()
            .find(|x| now.at.duration_since(x.at) >= RATE_WINDOW)
            .or(s.front())
            .copied()
            .unwrap_or(now);
        if s.back()
            .is_none_or(|b| now.at.duration_since(b.at) >= SAMPLE_EVERY)
        {
            if s.len() >= MAX_SAMPLES {
                s.pop_front();
            }
            s.push_back(now);
        }
        let dt = now.at.duration_since(base.at).as_secs_f64();
        if dt <= 0.0 {
            return (0.0, 0.0, 0.0);
        }
        (
            dt,
            now.bytes.saturating_sub(base.bytes) as f64 / dt,
            now.minibatches.saturating_sub(base.minibatches) as f64 / dt,
        )
    }
}

/// `GET /status.json`: the daemon, its datasets, throughput and streams.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub started_unix: f64,
    pub uptime_s: f64,
    pub datasets: Vec<DatasetView>,
    pub throughput: Throughput,
    /// Open streams and attachments, oldest first.
    pub streams: Vec<StreamView>,
    /// Open streams not listed: more than [`MAX_LISTED_STREAMS`] were open.
    pub streams_unlisted: u64,
    /// The last [`MAX_FINISHED_STREAMS`] finished, newest first.
    pub finished: Vec<StreamView>,
    pub limits: StatusLimits,
}

/// The bounds of this page, so readers know what they may be missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusLimits {
    pub max_listed_streams: usize,
    pub max_finished_streams: usize,
    pub max_png_images: usize,
    pub max_png_pixels: usize,
    pub max_batch_size: usize,
}

/// One served dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetView {
    pub name: String,
    /// The file it was loaded from (its name only).
    pub source: String,
    pub format: String,
    /// GetInfo's fingerprint; `None` until the statistics are computed
    /// (in the background, from start-up).
    pub fingerprint: Option<String>,
    pub memory_bytes: u64,
    pub pinned: bool,
    /// Where it can be read from: "host" (gRPC), "attach" (with `--uds`),
    /// "device GPU-... (name)" per device copy (with `--device`).
    pub tiers: Vec<String>,
    pub sets: Vec<SetView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetView {
    pub name: String,
    pub examples: u64,
    pub x: TensorView,
    pub y: TensorView,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorView {
    /// Shape of one example.
    pub shape: Vec<u64>,
    pub dtype: String,
    pub sha256: Option<String>,
}

/// Daemon-wide rates, from the counters behind `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// Seconds the rates are measured over.
    pub window_s: f64,
    pub bytes_per_s: f64,
    pub minibatches_per_s: f64,
    pub bytes_total: u64,
    pub minibatches_total: u64,
    pub active_streams: u64,
    pub attached: u64,
}

/// One open (or finished) stream or attachment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamView {
    pub id: u64,
    pub dataset: String,
    /// "" for an attachment (it maps every set).
    pub set: String,
    /// "GetBatch", "StreamBatches" or "Attach".
    pub method: String,
    pub size: u32,
    pub shuffle: bool,
    pub seed: u64,
    pub epoch: u64,
    pub rank: u32,
    pub world_size: u32,
    pub offset: u64,
    /// Minibatches `start..end` of the order this stream sends.
    pub start: u64,
    pub end: u64,
    /// Minibatches sent so far; the next is `start + sent`.
    pub sent: u64,
    pub bytes: u64,
    /// Mean since the stream started.
    pub minibatches_per_s: f64,
    pub bytes_per_s: f64,
    pub peer: String,
    pub pid: Option<u32>,
    pub trainer: String,
    pub started_unix: f64,
    pub seconds: f64,
    /// How it ended (finished entries only): a gRPC code name
    /// ("Ok", "Cancelled", ...) or "detached".
    pub outcome: Option<String>,
}

impl StreamView {
    fn of(e: &Entry, seconds: f64, outcome: Option<String>) -> Self {
        let (sent, bytes) = (
            e.sent.load(Ordering::Relaxed),
            e.bytes.load(Ordering::Relaxed),
        );
        let per = |v: u64| {
            if seconds > 0.0 {
                v as f64 / seconds
            } else {
                0.0
            }
        };
        let o = &e.req.order;
        Self {
            id: e.id,
            dataset: e.dataset.clone(),
            set: e.req.set.clone(),
            method: e.req.method.into(),
            size: e.req.size,
            shuffle: o.shuffle,
            seed: o.seed,
            epoch: o.epoch,
            rank: o.rank,
            world_size: o.world_size.max(1),
            offset: o.offset,
            start: e.start,
            end: e.end,
            sent,
            bytes,
            minibatches_per_s: per(sent),
            bytes_per_s: per(bytes),
            peer: e.req.caller.peer.addr.clone(),
            pid: e.req.caller.peer.pid,
            trainer: e.req.caller.trainer.clone(),
            started_unix: e.started_unix,
            seconds,
            outcome,
        }
    }
}

/// The snapshot of `m`'s daemon (statistics not ready yet show as `None`).
pub fn snapshot(m: &Metrics) -> Snapshot {
    let b = &m.status;
    let (minibatches, bytes) = m.totals();
    let (window_s, bytes_per_s, minibatches_per_s) = b.rates(Sample {
        at: Instant::now(),
        minibatches,
        bytes,
    });
    let uds = b.served.get().is_some_and(|s| s.uds);
    let catalog = b.catalog();
    let datasets = catalog.as_ref().map_or_else(Vec::new, |c| {
        c.all().iter().map(|p| dataset_view(p, uds)).collect()
    });
    let max_batch_size = catalog.map_or(0, |c| c.limits.max_batch_size);
    let (streams, unlisted, finished) = {
        let r = lock(&b.reg);
        let open = r
            .open
            .values()
            .map(|e| StreamView::of(e, e.started.elapsed().as_secs_f64(), None))
            .collect();
        let fin = r
            .finished
            .iter()
            .rev()
            .map(|f| StreamView::of(&f.entry, f.seconds, Some(f.outcome.clone())))
            .collect();
        (open, r.unlisted, fin)
    };
    Snapshot {
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix: b.started_unix,
        uptime_s: b.started.elapsed().as_secs_f64(),
        datasets,
        throughput: Throughput {
            window_s,
            bytes_per_s,
            minibatches_per_s,
            bytes_total: bytes,
            minibatches_total: minibatches,
            active_streams: m.active_streams.load(Ordering::Relaxed),
            attached: m.attach.attached.load(Ordering::Relaxed),
        },
        streams,
        streams_unlisted: unlisted,
        finished,
        limits: StatusLimits {
            max_listed_streams: MAX_LISTED_STREAMS,
            max_finished_streams: MAX_FINISHED_STREAMS,
            max_png_images: png::MAX_IMAGES,
            max_png_pixels: png::MAX_PIXELS,
            max_batch_size,
        },
    }
}

fn dataset_view(p: &Prepared, uds: bool) -> DatasetView {
    let stats = p.stats_now();
    let ds = &p.dataset;
    let sets = p
        .sets
        .iter()
        .map(|s| {
            let [x, y] = s.tensors().map(|t| TensorView {
                shape: t.tensor.shape[1..].iter().map(|&d| d as u64).collect(),
                dtype: t.tensor.dtype.name().into(),
                sha256: stats
                    .as_ref()
                    .and_then(|st| st.get(&s.name, t.name))
                    .map(|st| st.sha256.clone()),
            });
            SetView {
                name: s.name.clone(),
                examples: s.examples() as u64,
                x,
                y,
            }
        })
        .collect();
    let mut tiers = vec!["host".to_string()];
    if uds {
        tiers.push("attach".into());
    }
    // "device GPU-... (name)" for each device copy (`--device`).
    tiers.extend(
        p.devices
            .iter()
            .map(|c| format!("device {} ({})", c.device.uuid(), c.device.name())),
    );
    DatasetView {
        name: p.name.clone(),
        source: std::path::Path::new(&ds.source)
            .file_name()
            .map_or_else(|| ds.source.clone(), |f| f.to_string_lossy().into_owned()),
        format: ds.format.name().into(),
        fingerprint: stats.map(|s| s.fingerprint.clone()),
        memory_bytes: ds.memory_bytes as u64,
        pinned: ds.pin == PinState::Pinned,
        tiers,
        sets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(set: &str) -> StreamRequest {
        Caller::default().stream("StreamBatches", set, 10, None)
    }

    #[test]
    fn the_list_is_bounded_and_finished_entries_age_out() {
        let b = Board::default();
        let reg = || lock(&b.reg);
        let mut shown: Vec<Shown> = (0..MAX_LISTED_STREAMS + 5)
            .map(|i| b.add(req(&format!("s{i}")), "d".into(), 0..3))
            .collect();
        assert_eq!(reg().open.len(), MAX_LISTED_STREAMS);
        assert_eq!(reg().unlisted, 5);
        shown[0].sent(100);
        shown[0].sent(100);
        assert_eq!(reg().open[&0].sent.load(Ordering::Relaxed), 2);
        // Unlisted ones leave the count; listed ones move to finished.
        shown.truncate(MAX_LISTED_STREAMS);
        assert_eq!(reg().unlisted, 0);
        shown[0].finish("Ok");
        drop(shown.remove(0));
        assert_eq!(reg().finished.back().unwrap().outcome, "Ok");
        drop(shown);
        assert!(reg().open.is_empty());
        assert_eq!(reg().finished.len(), MAX_FINISHED_STREAMS);
        assert_eq!(reg().finished.back().unwrap().outcome, "Cancelled");
    }

    #[test]
    fn rates_come_from_samples_at_least_the_window_old() {
        let b = Board::default();
        let t0 = b.started;
        let at = |s: u64| t0 + Duration::from_secs(s);
        let s = |t: u64, mb: u64| Sample {
            at: at(t),
            minibatches: mb,
            bytes: mb * 10,
        };
        assert_eq!(b.rates(s(4, 40)), (4.0, 100.0, 10.0));
        let (dt, bps, mbps) = b.rates(s(5, 60));
        assert_eq!((dt, bps, mbps), (5.0, 120.0, 12.0), "t=4 is under 2 s old");
        assert_eq!(b.rates(s(7, 80)), (2.0, 100.0, 10.0), "t=5 is 2 s old");
    }

    #[test]
    fn callers_are_short_and_printable() {
        let mut h = ::http::HeaderMap::new();
        // A tab is a valid header byte and a control character.
        h.insert("user-agent", "grpc-python/1.76\tx".parse().unwrap());
        let c = Caller::of(None, &h);
        assert_eq!(c.trainer, "grpc-python/1.76x");
        h.insert("x-trainer-id", "x".repeat(500).parse().unwrap());
        assert_eq!(Caller::of(None, &h).trainer.len(), MAX_TRAINER_CHARS);
        assert_eq!(Peer::unix(Some(0)).pid, None);
        assert_eq!(Peer::unix(Some(42)).to_string(), "unix pid 42");
    }
}
