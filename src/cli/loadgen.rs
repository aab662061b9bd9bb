//! `minibatchd bench`: a load generator. Concurrent clients (each its own
//! connection) fetch minibatches for a count or a duration; the report has
//! throughput and per-minibatch latency percentiles.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_stream::StreamExt;

use crate::client::{BatchRequest, Client, ClientError, ClientOptions};
use crate::store::DType;

/// Which RPC the load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One GetBatch per minibatch, cycling through the epoch.
    GetBatch,
    /// Whole epochs as StreamBatches calls.
    StreamBatches,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::GetBatch => "GetBatch",
            Method::StreamBatches => "StreamBatches",
        }
    }
}

/// What to load the server with.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub server: String,
    pub client: ClientOptions,
    pub method: Method,
    /// Which dataset of the server (empty: its only one).
    pub dataset: String,
    pub set: String,
    pub size: u32,
    pub x_dtype: Option<DType>,
    pub shuffle: bool,
    /// Concurrent clients, each with its own connection.
    pub concurrency: usize,
    /// Stop after this many minibatches in all (0: run for `duration`).
    pub count: u64,
    pub duration: Duration,
}

/// What the load achieved.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub method: &'static str,
    pub set: String,
    pub size: u32,
    pub concurrency: usize,
    pub minibatches: usize,
    pub seconds: f64,
    pub minibatches_per_s: f64,
    pub mb_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl LoadReport {
    /// One line for people.
    pub fn line(&self) -> String {
        format!(
            "{} size {} x{}: {} minibatches in {:.2} s = {:.1} minibatches/s, {:.1} MB/s; latency p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms",
            self.method,
            self.size,
            self.concurrency,
            self.minibatches,
            self.seconds,
            self.minibatches_per_s,
            self.mb_per_s,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("the server has no set {0:?}")]
    NoSet(String),
    #[error("a load task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Counters shared by the clients.
#[derive(Default)]
struct Totals {
    minibatches: AtomicU64,
    bytes: AtomicU64,
}

/// Runs the load; with `progress`, prints a running total to stderr each second.
pub async fn run(spec: LoadSpec, progress: bool) -> Result<LoadReport, LoadError> {
    let info = Client::connect_with(&spec.server, &spec.client)
        .await?
        .info_of(&spec.dataset)
        .await?;
    let n = tensor_chunks::set_info(&info, &spec.dataset, &spec.set)
        .map(|s| s.examples)
        .ok_or_else(|| LoadError::NoSet(spec.set.clone()))?;
    let batches = n.div_ceil(spec.size as u64).max(1);
    let deadline = Instant::now() + spec.duration;
    let totals = Arc::new(Totals::default());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..spec.concurrency.max(1))
        .map(|w| {
            let (spec, totals) = (spec.clone(), totals.clone());
            tokio::spawn(async move {
                one_client(spec, w as u64 % batches, batches, deadline, &totals).await
            })
        })
        .collect();
    let ticker = progress.then(|| {
        let totals = totals.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = t0.elapsed().as_secs_f64();
                eprint!(
                    "\r{:>6.1} s  {} minibatches  {:.1} MB/s   ",
                    s,
                    totals.minibatches.load(Ordering::Relaxed),
                    totals.bytes.load(Ordering::Relaxed) as f64 / s / 1e6
                );
            }
        })
    });
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let bytes = totals.bytes.load(Ordering::Relaxed) as f64;
    Ok(LoadReport {
        method: spec.method.name(),
        set: spec.set,
        size: spec.size,
        concurrency: spec.concurrency,
        minibatches: lat.len(),
        seconds: secs,
        minibatches_per_s: lat.len() as f64 / secs,
        mb_per_s: bytes / secs / 1e6,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
    })
}

/// One client's loop; returns its per-minibatch latencies.
async fn one_client(
    spec: LoadSpec,
    first: u64,
    batches: u64,
    deadline: Instant,
    totals: &Totals,
) -> Result<Vec<Duration>, ClientError> {
    let mut c = Client::connect_with(&spec.server, &spec.client).await?;
    let mut lat = Vec::new();
    // Claims one more minibatch of the run, if there is one.
    let more = || {
        let claimed = totals.minibatches.fetch_add(1, Ordering::Relaxed);
        if spec.count > 0 {
            claimed < spec.count
        } else {
            Instant::now() < deadline
        }
    };
    let got = |b: &crate::client::Batch| {
        let n = b.x.data.len() + b.y.data.len();
        totals.bytes.fetch_add(n as u64, Ordering::Relaxed);
    };
    let mut r = BatchRequest::new(&spec.set, 0, spec.size);
    r.dataset = spec.dataset.clone();
    r.x_dtype = spec.x_dtype;
    r.order.shuffle = spec.shuffle;
    let mut i = first;
    match spec.method {
        Method::GetBatch => {
            while more() {
                r.index = i;
                let s = Instant::now();
                let b = c.get_batch(&r).await?;
                lat.push(s.elapsed());
                got(&b);
                i = (i + 1) % batches;
            }
        }
        Method::StreamBatches => 'epochs: loop {
            let mut st = c.stream_batches(&r).await?;
            let mut s = Instant::now();
            while let Some(b) = st.next().await {
                let b = b?;
                lat.push(s.elapsed());
                s = Instant::now();
                got(&b);
                if !more() {
                    break 'epochs;
                }
            }
        },
    }
    Ok(lat)
}
