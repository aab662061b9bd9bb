//! Prometheus metrics and the tiny HTTP endpoint that serves them.
//!
//! Hand-rolled on purpose: a handful of counters and histograms do not justify
//! a metrics framework and an HTTP stack in the data path's binary. The text
//! format is Prometheus exposition format 0.0.4.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Latency buckets in seconds: from a small minibatch on loopback (~100 µs)
/// to a whole epoch streamed to a slow client.
pub const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0,
];

/// Longest request head the endpoint reads before answering 431.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a request head may take to arrive.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the answer may take to be written: a status page PNG is up to
/// a few MB, which a reader that stops reading must not hold a
/// connection slot for (a scrape is written in microseconds).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// All metrics of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String), u64>>,
    /// By (method, dataset): dataset names are fixed at start-up and at
    /// most `catalog::MAX_DATASETS`, so the labels stay bounded.
    minibatches: Mutex<BTreeMap<(String, String), u64>>,
    bytes: Mutex<BTreeMap<(String, String), u64>>,
    /// Host bytes of each dataset, and whether they are locked in RAM.
    datasets: Mutex<BTreeMap<String, (u64, bool)>>,
    /// Device bytes of each (dataset, device UUID) copy (`--device`).
    devices: Mutex<BTreeMap<(String, String), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub active_streams: AtomicU64,
    /// Host bytes of x mirrors in narrower wire dtypes (see `mirror`).
    pub mirror_bytes: AtomicU64,
    /// The memory budget, once the server made it (its size and use).
    budget: std::sync::OnceLock<crate::batch::budget::Budget>,
    /// Chunks that had to wait for budget.
    pub budget_waits: AtomicU64,
    /// Streams ended with RESOURCE_EXHAUSTED after waiting for budget.
    pub budget_refusals: AtomicU64,
    /// Connection slots and handshakes (see `server`).
    pub conns: ConnMetrics,
    pub attach: AttachMetrics,
    /// Open streams and attachments, and what the status endpoints serve
    /// (`crate::status`).
    pub status: crate::status::Board,
}

impl Metrics {
    /// Reports `b`'s size and use from now on.
    pub fn set_budget(&self, b: crate::batch::budget::Budget) {
        let _ = self.budget.set(b);
    }

    /// Counts a finished RPC with its gRPC status code name and duration.
    pub fn request(&self, method: &str, code: tonic::Code, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((method.to_string(), format!("{code:?}")))
            .or_default() += 1;
        let mut l = self.latency.lock().unwrap();
        let h = l.entry(method.to_string()).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// Records dataset `name`'s host memory (once, when it is prepared).
    pub fn dataset(&self, name: &str, bytes: u64, pinned: bool) {
        self.datasets
            .lock()
            .unwrap()
            .insert(name.to_string(), (bytes, pinned));
    }

    /// Records dataset `name`'s copy on device `uuid` (once, at start-up).
    pub fn device(&self, name: &str, uuid: &str, bytes: u64) {
        self.devices
            .lock()
            .unwrap()
            .insert((name.to_string(), uuid.to_string()), bytes);
    }

    /// Counts one minibatch of dataset `dataset` of `bytes` payload bytes sent.
    pub fn minibatch(&self, method: &str, dataset: &str, bytes: u64) {
        let key = || (method.to_string(), dataset.to_string());
        *self.minibatches.lock().unwrap().entry(key()).or_default() += 1;
        *self.bytes.lock().unwrap().entry(key()).or_default() += bytes;
    }

    /// Minibatches and tensor bytes sent, all methods and datasets together (the
    /// status page's throughput).
    pub fn totals(&self) -> (u64, u64) {
        let sum = |m: &Mutex<BTreeMap<(String, String), u64>>| m.lock().unwrap().values().sum();
        (sum(&self.minibatches), sum(&self.bytes))
    }

    /// Renders the exposition text.
    pub fn render(&self) -> String {
        let mut o = String::new();
        o.push_str("# HELP minibatchd_requests_total RPCs finished, by method and gRPC status code.\n# TYPE minibatchd_requests_total counter\n");
        for ((m, c), v) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                o,
                "minibatchd_requests_total{{method=\"{m}\",code=\"{c}\"}} {v}"
            );
        }
        o.push_str("# HELP minibatchd_minibatches_total Minibatches sent.\n# TYPE minibatchd_minibatches_total counter\n");
        for ((m, d), v) in self.minibatches.lock().unwrap().iter() {
            let _ = writeln!(
                o,
                "minibatchd_minibatches_total{{method=\"{m}\",dataset=\"{d}\"}} {v}"
            );
        }
        o.push_str("# HELP minibatchd_sent_bytes_total Tensor payload bytes sent.\n# TYPE minibatchd_sent_bytes_total counter\n");
        for ((m, d), v) in self.bytes.lock().unwrap().iter() {
            let _ = writeln!(
                o,
                "minibatchd_sent_bytes_total{{method=\"{m}\",dataset=\"{d}\"}} {v}"
            );
        }
        o.push_str("# HELP minibatchd_request_duration_seconds RPC duration, first byte in to last byte out.\n# TYPE minibatchd_request_duration_seconds histogram\n");
        for (m, h) in self.latency.lock().unwrap().iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "minibatchd_request_duration_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                o,
                "minibatchd_request_duration_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                o,
                "minibatchd_request_duration_seconds_sum{{method=\"{m}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                o,
                "minibatchd_request_duration_seconds_count{{method=\"{m}\"}} {}",
                h.count
            );
        }
        let put = |o: &mut String, kind: &str, name: &str, help: &str, v: u64| {
            let _ = write!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        let g = |o: &mut String, name: &str, help: &str, v: u64| put(o, "gauge", name, help, v);
        let c = |o: &mut String, name: &str, help: &str, v: u64| put(o, "counter", name, help, v);
        g(
            &mut o,
            "minibatchd_active_streams",
            "Response streams in flight.",
            self.active_streams.load(Ordering::Relaxed),
        );
        {
            let ds = self.datasets.lock().unwrap();
            o.push_str("# HELP minibatchd_dataset_bytes Host bytes holding each dataset.\n# TYPE minibatchd_dataset_bytes gauge\n");
            for (d, (bytes, _)) in ds.iter() {
                let _ = writeln!(o, "minibatchd_dataset_bytes{{dataset=\"{d}\"}} {bytes}");
            }
            o.push_str("# HELP minibatchd_dataset_pinned_bytes Host bytes of each dataset locked in RAM (mlock).\n# TYPE minibatchd_dataset_pinned_bytes gauge\n");
            for (d, (bytes, pinned)) in ds.iter() {
                let pinned = if *pinned { *bytes } else { 0 };
                let _ = writeln!(
                    o,
                    "minibatchd_dataset_pinned_bytes{{dataset=\"{d}\"}} {pinned}"
                );
            }
        }
        {
            let dev = self.devices.lock().unwrap();
            if !dev.is_empty() {
                o.push_str("# HELP minibatchd_device_bytes Device bytes holding each dataset's copy (--device).\n# TYPE minibatchd_device_bytes gauge\n");
                for ((d, u), bytes) in dev.iter() {
                    let _ = writeln!(
                        o,
                        "minibatchd_device_bytes{{dataset=\"{d}\",device=\"{u}\"}} {bytes}"
                    );
                }
            }
        }
        g(
            &mut o,
            "minibatchd_mirror_bytes",
            "Host bytes of x mirrors in a narrower wire dtype (uint8), built on first demand.",
            self.mirror_bytes.load(Ordering::Relaxed),
        );
        if let Some(b) = self.budget.get() {
            g(
                &mut o,
                "minibatchd_budget_bytes",
                "The memory budget for bytes gathered or converted per request (--memory-budget-bytes).",
                b.bytes() as u64,
            );
            g(
                &mut o,
                "minibatchd_budget_held_bytes",
                "Bytes of the memory budget held now by chunks in flight and shuffled minibatches.",
                b.held(),
            );
            c(
                &mut o,
                "minibatchd_budget_evictions_total",
                "Connections closed because their streams held memory budget unread while others waited.",
                b.evictions(),
            );
        }
        c(
            &mut o,
            "minibatchd_budget_waits_total",
            "Chunks that waited for memory budget.",
            self.budget_waits.load(Ordering::Relaxed),
        );
        c(
            &mut o,
            "minibatchd_budget_refusals_total",
            "Streams refused with RESOURCE_EXHAUSTED after waiting for memory budget.",
            self.budget_refusals.load(Ordering::Relaxed),
        );
        self.conns.render(&mut o);
        self.attach.render(&mut o);
        o
    }
}

/// Same-host clients attached to the dataset's memory (`crate::attach`).
#[derive(Debug, Default)]
pub struct AttachMetrics {
    /// Attachments open now (each a process's connection on the socket).
    pub attached: AtomicU64,
    /// Attach exchanges answered with descriptors.
    pub accepted: AtomicU64,
    /// Attach exchanges refused (token, limit, bad request, TCP).
    pub refused: AtomicU64,
}

impl AttachMetrics {
    fn render(&self, o: &mut String) {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = write!(
            o,
            "# HELP minibatchd_attached_processes Same-host clients attached to the dataset's memory now (open attach connections).\n# TYPE minibatchd_attached_processes gauge\nminibatchd_attached_processes {}\n",
            v(&self.attached)
        );
        for (name, help, a) in [
            ("accepted", "Attach requests answered with the dataset's memory descriptors.", &self.accepted),
            ("refused", "Attach requests refused (token, --max-attached, malformed, or not on the Unix socket).", &self.refused),
        ] {
            let _ = write!(
                o,
                "# HELP minibatchd_attach_{name}_total {help}\n# TYPE minibatchd_attach_{name}_total counter\nminibatchd_attach_{name}_total {}\n",
                v(a)
            );
        }
    }
}

/// What happened to gRPC connections before they were served: the counts
/// behind the server's rate-limited log lines.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    /// Connection slots held (pending or established).
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed at accept: every slot held by an established connection.
    pub refused: AtomicU64,
    /// Closed before their handshake ended, for a newer connection.
    pub evicted: AtomicU64,
    /// Closed for sending no HTTP/2 preface within the handshake timeout.
    pub handshake_timeouts: AtomicU64,
    /// Closed for a failed TLS handshake or bytes that are not HTTP/2.
    pub handshake_failures: AtomicU64,
    /// Failed accepts (out of file descriptors, ...).
    pub accept_errors: AtomicU64,
}

impl ConnMetrics {
    fn render(&self, o: &mut String) {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = write!(
            o,
            "# HELP minibatchd_connections_open gRPC connection slots held (before and after the handshake).\n# TYPE minibatchd_connections_open gauge\nminibatchd_connections_open {}\n",
            v(&self.open)
        );
        for (name, help, a) in [
            ("accepted", "gRPC connections accepted.", &self.accepted),
            ("refused", "gRPC connections closed at accept: every slot held by an established connection.", &self.refused),
            ("evicted", "gRPC connections closed before their handshake ended to give the slot to a newer one.", &self.evicted),
            ("handshake_timeouts", "gRPC connections closed for sending no HTTP/2 preface within the handshake timeout.", &self.handshake_timeouts),
            ("handshake_failures", "gRPC connections closed for a failed TLS handshake or bytes that are not HTTP/2.", &self.handshake_failures),
            ("accept_errors", "Failed accepts on the gRPC listener (e.g. out of file descriptors).", &self.accept_errors),
        ] {
            let _ = write!(
                o,
                "# HELP minibatchd_connections_{name}_total {help}\n# TYPE minibatchd_connections_{name}_total counter\nminibatchd_connections_{name}_total {}\n",
                v(a)
            );
        }
    }
}

/// Default cap on metrics connections served at once. A scrape takes
/// milliseconds and comes from one or two Prometheus servers; 32 leaves
/// room for those and people with curl. Without a cap, 1,100 connections
/// held 1,100 descriptors and starved the gRPC listener.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 32;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves, at most
/// `max_connections` at once: further connections wait in the listen
/// backlog (they hold no descriptor of ours there) until one ends, which
/// each does within [`READ_TIMEOUT`] for its request, a render slot's
/// wait (`status::web::RENDER_WAIT`) and [`WRITE_TIMEOUT`] for its answer.
/// Besides `/metrics` it answers the status endpoints (`crate::status::web`).
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut errors = crate::server::AcceptErrors::new("metrics");
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
        };
        let (mut sock, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => {
                    errors.ok();
                    x
                }
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            },
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(READ_TIMEOUT, async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
            use crate::status::web::{self, Response};
            let resp = if line.starts_with(b"GET /metrics ") {
                Response::new(200, "text/plain; version=0.0.4", m.render())
            } else if head.len() >= MAX_REQUEST_HEAD {
                Response::new(431, "text/plain", "")
            } else {
                // `/`, /status.json, /minibatch.png; 404 for the rest.
                web::answer(&m, &head).await
            };
            let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                sock.write_all(&resp.head()).await?;
                sock.write_all(&resp.body).await?;
                sock.shutdown().await
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters, histogram buckets (cumulative, with +Inf, sum and count)
    /// and gauges in exposition format 0.0.4, each with HELP and TYPE.
    #[test]
    fn renders_exposition_text() {
        let m = Metrics::default();
        m.request("GetBatch", tonic::Code::Ok, Duration::from_micros(300));
        m.request("GetBatch", tonic::Code::Ok, Duration::from_secs(2));
        m.request("GetBatch", tonic::Code::ResourceExhausted, Duration::ZERO);
        m.minibatch("GetBatch", "mnist", 1000);
        m.minibatch("GetBatch", "mnist", 24);
        m.minibatch("GetBatch", "cifar", 7);
        m.dataset("mnist", 4096, true);
        m.dataset("cifar", 100, false);
        m.set_budget(crate::batch::budget::Budget::new(
            4096,
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let page = m.render();
        for line in [
            "minibatchd_requests_total{method=\"GetBatch\",code=\"Ok\"} 2",
            "minibatchd_requests_total{method=\"GetBatch\",code=\"ResourceExhausted\"} 1",
            "minibatchd_minibatches_total{method=\"GetBatch\",dataset=\"mnist\"} 2",
            "minibatchd_minibatches_total{method=\"GetBatch\",dataset=\"cifar\"} 1",
            "minibatchd_sent_bytes_total{method=\"GetBatch\",dataset=\"mnist\"} 1024",
            "minibatchd_dataset_bytes{dataset=\"mnist\"} 4096",
            "minibatchd_dataset_pinned_bytes{dataset=\"mnist\"} 4096",
            "minibatchd_dataset_pinned_bytes{dataset=\"cifar\"} 0",
            "minibatchd_request_duration_seconds_bucket{method=\"GetBatch\",le=\"0.0001\"} 1",
            "minibatchd_request_duration_seconds_bucket{method=\"GetBatch\",le=\"0.0005\"} 2",
            "minibatchd_request_duration_seconds_bucket{method=\"GetBatch\",le=\"1\"} 2",
            "minibatchd_request_duration_seconds_bucket{method=\"GetBatch\",le=\"10\"} 3",
            "minibatchd_request_duration_seconds_bucket{method=\"GetBatch\",le=\"+Inf\"} 3",
            "minibatchd_request_duration_seconds_count{method=\"GetBatch\"} 3",
            "# TYPE minibatchd_budget_bytes gauge",
            "minibatchd_budget_bytes 4096",
            "minibatchd_budget_held_bytes 0",
            "# TYPE minibatchd_budget_refusals_total counter",
            "# TYPE minibatchd_active_streams gauge",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "{line:?} missing from:\n{page}"
            );
        }
        // Every sample line belongs to a family announced with HELP and TYPE.
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| page.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(page.contains(&format!("# HELP {family} ")), "{family}");
            assert!(page.contains(&format!("# TYPE {family} ")), "{family}");
        }
    }
}
