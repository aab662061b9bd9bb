//! The command line's flags (clap derive, every serving flag also an
//! environment variable) and what they turn into: server options, load
//! options, client options, a load spec. The binary parses [`Cli`] and
//! dispatches; nothing here does I/O but reading a token file or dataset.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::catalog::{self, Datasets};
use crate::cli::loadgen::{LoadSpec, Method};
use crate::client::Client;
use crate::load::{self, LoadOptions, PinPolicy};
use crate::memory::Backing;
use crate::service::{Limits, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGE_BYTES};
use crate::store::DType;

#[derive(Parser)]
#[command(
    name = "minibatchd",
    version,
    about = "Loads a training dataset once into pinned memory and serves minibatches over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "MINIBATCHD_LOG_FORMAT",
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "minibatchd=debug").
    #[arg(long, global = true, env = "MINIBATCHD_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Load a dataset and serve it over gRPC.
    Serve(Box<ServeArgs>),
    /// Load a dataset and describe it: sets, shapes, dtypes, ranges, sha256s.
    Inspect(InspectArgs),
    /// Ask a server for its dataset descriptions (GetInfo).
    Info(InfoArgs),
    /// Fetch one minibatch; print a summary or write .npy files.
    Get(GetArgs),
    /// Check a server's gRPC health; exit 0 when SERVING (for container probes).
    Health(ClientArgs),
    /// Load generator: fetch minibatches and report throughput and latency.
    Bench(BenchArgs),
    /// What a daemon is doing: datasets, throughput, open streams (its
    /// /status.json on the metrics address).
    Status(crate::cli::status::StatusArgs),
    /// Benchmark helper: only inflate a gzip file with the loader's
    /// decompressor (the floor a load is compared with).
    #[command(hide = true)]
    Inflate { path: PathBuf },
}

#[derive(Args)]
pub struct LoadArgs {
    /// Dataset to serve, as PATH or NAME=PATH; repeat it (or, in the
    /// environment variable, separate them with commas) to serve several.
    /// PATH: a file or directory in any format README "Loader" lists. NAME
    /// (letters, digits, '_', '-') is what requests put in their `dataset`
    /// field; without one, the file name up to its first dot. Default: the
    /// bundled sample of 5,000 real MNIST digits, named mnist-sample.
    #[arg(
        long = "data",
        value_name = "[NAME=]PATH",
        env = "MINIBATCHD_DATA",
        value_delimiter = ','
    )]
    pub data: Vec<String>,
    /// Datasets without a validation set (IDX, .npz, .npy, CIFAR): how many
    /// of the training examples (the last ones) become one. Default: 10,000
    /// for IDX, .npz and .npy (the tutorial's split of MNIST), none for
    /// CIFAR (its official train/test split). Pickles bring their own.
    #[arg(long, env = "MINIBATCHD_VALID_SPLIT")]
    pub valid_split: Option<usize>,
    /// Refuse datasets that inflate beyond this many bytes (default: 3/4 of RAM).
    #[arg(long, env = "MINIBATCHD_MAX_DATASET_BYTES")]
    pub max_dataset_bytes: Option<usize>,
}

/// One `--data` value: `NAME=PATH` when it holds a `=` with no `/`
/// before it (`./a=b.npz` and `/data/a=b` are paths), else a path whose
/// dataset is named after it ([`catalog::name_from_path`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub name: String,
    pub path: PathBuf,
}

impl DataSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.contains('/') => {
                catalog::check_name(name).map_err(|e| format!("--data {s:?}: {e}"))?;
                if path.is_empty() {
                    return Err(format!("--data {s:?}: no path after {name}="));
                }
                Ok(Self {
                    name: name.into(),
                    path: path.into(),
                })
            }
            _ => Ok(Self {
                name: catalog::name_from_path(Path::new(s)),
                path: s.into(),
            }),
        }
    }
}

impl LoadArgs {
    /// The datasets asked for; empty values (compose files often pass an
    /// empty MINIBATCHD_DATA) mean "unset".
    pub fn specs(&self) -> Result<Vec<DataSpec>, String> {
        self.data
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(DataSpec::parse)
            .collect()
    }

    /// Loads every dataset into `backing` (shared memory only where a
    /// client can attach to it: `serve --uds`; see [`catalog::load`]), or
    /// the bundled sample when none is given.
    pub fn load_all(&self, pin: PinPolicy, backing: Backing) -> anyhow::Result<Datasets> {
        let specs = self.specs().map_err(anyhow::Error::msg)?;
        if specs.is_empty() {
            let ds = self.load(None, pin, backing)?;
            return Ok(Datasets::one(std::sync::Arc::new(ds)));
        }
        let named: Vec<(String, PathBuf)> = specs.into_iter().map(|s| (s.name, s.path)).collect();
        let opts = self.options(pin, backing);
        catalog::load(&named, &opts)
    }

    fn options(&self, pin: PinPolicy, backing: Backing) -> LoadOptions {
        LoadOptions {
            max_bytes: self
                .max_dataset_bytes
                .unwrap_or_else(load::default_max_bytes),
            valid_split: self.valid_split,
            pin,
            backing,
        }
    }

    /// Loads the dataset at `path` (None: the bundled sample).
    pub fn load(
        &self,
        path: Option<&Path>,
        pin: PinPolicy,
        backing: Backing,
    ) -> anyhow::Result<crate::store::Dataset> {
        let opts = self.options(pin, backing);
        Ok(match path {
            Some(p) => load::load(p, &opts)?,
            None => {
                tracing::info!(
                    "no --data given: using the bundled sample ({})",
                    crate::BUNDLED_SAMPLE_NAME
                );
                load::load_bytes(
                    Path::new(crate::BUNDLED_SAMPLE_NAME),
                    crate::BUNDLED_SAMPLE,
                    &opts,
                )?
            }
        })
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// gRPC listen address.
    #[arg(long, env = "MINIBATCHD_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Prometheus metrics listen address (HTTP, GET /metrics); "off" disables.
    #[arg(
        long,
        env = "MINIBATCHD_METRICS_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub metrics_addr: String,
    /// Largest minibatch (examples) a request may ask for.
    #[arg(long, env = "MINIBATCHD_MAX_BATCH_SIZE", default_value_t = DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: usize,
    /// Largest gRPC message sent or accepted (4 MiB keeps stock clients working).
    #[arg(long, env = "MINIBATCHD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Largest tensor data per message; must leave 1 KiB of the message size for other fields.
    #[arg(long, env = "MINIBATCHD_CHUNK_BYTES", default_value_t = crate::service::DEFAULT_CHUNK_BYTES)]
    pub chunk_bytes: usize,
    /// Bytes all requests together may hold in gathered or converted chunks
    /// (shuffled, sharded or narrowed minibatches); more waits, then is
    /// refused with RESOURCE_EXHAUSTED. Contiguous float32 minibatches are
    /// slices of the dataset and take none.
    #[arg(long, env = "MINIBATCHD_MEMORY_BUDGET_BYTES", default_value_t = crate::batch::budget::DEFAULT_BUDGET_BYTES)]
    pub memory_budget_bytes: usize,
    /// Seconds a lease of memory budget may stay unsent while other streams
    /// wait for budget before its connection is closed (never-read streams).
    #[arg(long, env = "MINIBATCHD_BUDGET_STALL_SECS", default_value = "2", value_parser = secs)]
    pub budget_stall_secs: Duration,
    /// Seconds a chunk may wait for memory budget before its stream is refused.
    #[arg(long, env = "MINIBATCHD_BUDGET_WAIT_SECS", default_value = "10", value_parser = secs)]
    pub budget_wait_secs: Duration,
    /// Seconds a request message may take to arrive after its headers.
    #[arg(long, env = "MINIBATCHD_REQUEST_TIMEOUT_SECS", default_value = "10", value_parser = secs)]
    pub request_timeout_secs: Duration,
    /// Fail start-up if the dataset memory cannot be locked in RAM.
    #[arg(long, env = "MINIBATCHD_REQUIRE_PINNED", conflicts_with = "no_pin")]
    pub require_pinned: bool,
    /// Do not try to lock the dataset memory.
    #[arg(long, env = "MINIBATCHD_NO_PIN")]
    pub no_pin: bool,
    /// Seconds in-flight streams may continue after SIGTERM/SIGINT (at most a day).
    #[arg(long, env = "MINIBATCHD_SHUTDOWN_GRACE_SECS", default_value = "30", value_parser = secs)]
    pub shutdown_grace_secs: Duration,
    /// Connections served at once; more are closed at accept, unless one has
    /// not completed its handshake: the oldest such is closed instead.
    #[arg(long, env = "MINIBATCHD_MAX_CONNECTIONS", default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds from accept to the HTTP/2 preface (TLS handshake included);
    /// slower connections are closed and free their slot.
    #[arg(long, env = "MINIBATCHD_HANDSHAKE_TIMEOUT_SECS", default_value = "5", value_parser = secs)]
    pub handshake_timeout_secs: Duration,
    /// Listen backlog of the gRPC socket: connections queued before accept
    /// (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "MINIBATCHD_LISTEN_BACKLOG", default_value_t = crate::server::DEFAULT_LISTEN_BACKLOG, value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,
    /// Metrics connections served at once; more wait in the listen backlog.
    #[arg(long, env = "MINIBATCHD_METRICS_MAX_CONNECTIONS", default_value_t = crate::metrics::DEFAULT_METRICS_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub metrics_max_connections: usize,
    /// RPCs one connection may have in flight (HTTP/2 max concurrent streams).
    #[arg(long, env = "MINIBATCHD_MAX_CONCURRENT_STREAMS", default_value_t = crate::server::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Serving threads (each serves whole connections on its own
    /// single-threaded runtime); 0 = one per CPU.
    #[arg(long, env = "MINIBATCHD_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,
    /// Seconds between HTTP/2 keepalive pings (at least 1, at most a day); a
    /// peer silent for 10 s more is dropped.
    #[arg(long, env = "MINIBATCHD_KEEPALIVE_SECS", default_value = "30", value_parser = secs)]
    pub keepalive_secs: Duration,
    /// Require "authorization: Bearer TOKEN" on BatchService calls; the token
    /// is this file's content (health stays open for probes).
    #[arg(
        long,
        env = "MINIBATCHD_AUTH_TOKEN_FILE",
        conflicts_with = "auth_token"
    )]
    pub auth_token_file: Option<PathBuf>,
    /// The bearer token itself (prefer the file: environments leak into process listings less, files into none).
    #[arg(long, env = "MINIBATCHD_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "MINIBATCHD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "MINIBATCHD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve on this Unix domain socket (same services and limits, never
    /// TLS: the file's mode and group say who may connect); empty = off. A
    /// stale socket file there is replaced; the file is removed at exit.
    #[arg(long, env = "MINIBATCHD_UDS", value_name = "PATH", value_parser = path_or_empty)]
    pub uds: Option<PathBuf>,
    /// Mode of the unix socket file, in octal (connecting needs write
    /// permission).
    #[arg(long, env = "MINIBATCHD_UDS_MODE", default_value = "660", value_parser = octal_mode)]
    pub uds_mode: u32,
    /// Group to give the unix socket file (name or number); default: the
    /// daemon's.
    #[arg(long, env = "MINIBATCHD_UDS_GROUP", value_name = "NAME")]
    pub uds_group: Option<String>,
    /// Most same-host clients attached to the dataset's memory at once (on
    /// the unix socket; README "Attach"); more are refused with
    /// RESOURCE_EXHAUSTED. Each holds one descriptor of the daemon's.
    #[arg(long, env = "MINIBATCHD_MAX_ATTACHED", default_value_t = crate::attach::serve::DEFAULT_MAX_ATTACHED)]
    pub max_attached: usize,
    /// Copy every dataset once into the memory of these GPUs (cuda:0, or
    /// cuda:0,cuda:1) for trainers on this host to attach by CUDA IPC
    /// (needs --uds; README "Device memory"). Fails at start-up where the
    /// CUDA driver or the device is missing.
    #[arg(long, env = "MINIBATCHD_DEVICE", value_name = "cuda:N[,cuda:M]")]
    pub device: Option<String>,
}

/// A path, or "" for off (clap refuses empty paths of its own).
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// A file mode in octal ("660", "0660", "0o660"), at most 777.
fn octal_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!("{s:?} is not an octal file mode from 0 to 777")),
    }
}

#[derive(Args)]
pub struct InspectArgs {
    /// Dataset file or IDX directory (default: the bundled sample).
    pub path: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// As `serve --valid-split`.
    #[arg(long)]
    pub valid_split: Option<usize>,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Server address.
    #[arg(long, env = "MINIBATCHD_SERVER", default_value = "127.0.0.1:50051")]
    pub server: String,
    /// Bearer token, if the server asks for one.
    #[arg(long, env = "MINIBATCHD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate that signed the server's (turns TLS on).
    #[arg(long, env = "MINIBATCHD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Server name to verify (default: the host in --server).
    #[arg(long, env = "MINIBATCHD_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Busy-poll the socket for up to this many microseconds of each GetBatch
    /// instead of sleeping until the answer arrives (burns the client's core
    /// meanwhile; 0 = never).
    #[arg(long, env = "MINIBATCHD_BUSY_POLL_US", default_value_t = 0)]
    pub busy_poll_us: u64,
}

impl ClientArgs {
    pub fn options(&self) -> crate::client::ClientOptions {
        crate::client::ClientOptions {
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
            tls_domain: self.tls_domain.clone(),
            busy_poll: Duration::from_micros(self.busy_poll_us),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect_with(&self.server, &self.options()).await?)
    }
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Describe only this dataset (default: all of them).
    #[arg(long, default_value = "")]
    pub dataset: String,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Which dataset of the server (default: its only one).
    #[arg(long, default_value = "")]
    pub dataset: String,
    #[arg(long, default_value = "train")]
    pub set: String,
    #[arg(long, default_value_t = 0)]
    pub index: u64,
    #[arg(long, default_value_t = 500)]
    pub size: u32,
    /// Wire dtype of x (float32, uint8, float16, bfloat16); default as stored.
    #[arg(long)]
    pub x_dtype: Option<DType>,
    /// Wire dtype of y (int32); default as stored.
    #[arg(long)]
    pub y_dtype: Option<DType>,
    #[arg(long)]
    pub shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Positions of the epoch's order already consumed by all ranks
    /// together (elastic resume, README "Order").
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    #[arg(long, default_value_t = 0)]
    pub world_size: u32,
    /// Write x.npy and y.npy into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the minibatch as a PNG grid with labels (as the daemon's
    /// /minibatch.png draws it).
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum BenchMethod {
    GetBatch,
    StreamBatches,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Which dataset of the server (default: its only one).
    #[arg(long, default_value = "")]
    pub dataset: String,
    #[arg(long, value_enum, default_value = "get-batch")]
    pub method: BenchMethod,
    #[arg(long, default_value = "train")]
    pub set: String,
    #[arg(long, default_value_t = 500)]
    pub size: u32,
    /// Concurrent clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Stop after this many minibatches in all (0 = run for --duration).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Seconds to run when --count is 0.
    #[arg(long, default_value = "5", value_parser = secs)]
    pub duration: Duration,
    /// Wire dtype of x (float32, uint8, float16, bfloat16); default as stored.
    #[arg(long)]
    pub x_dtype: Option<DType>,
    #[arg(long)]
    pub shuffle: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl ServeArgs {
    /// Loads the datasets and, with `--device`, copies them to the devices.
    pub fn datasets(&self, backing: Backing) -> anyhow::Result<Datasets> {
        let spec = self
            .device
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        // Flags first: a mistake must not cost a load.
        let ordinals = spec.map(crate::device::parse_spec).transpose()?;
        if let Some(spec) = spec {
            if self.uds.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                anyhow::bail!(
                    "--device {spec}: trainers reach device copies by attaching over the Unix socket; give --uds PATH too"
                );
            }
        }
        let datasets = self.load.load_all(self.pin(), backing)?;
        let (Some(spec), Some(ordinals)) = (spec, ordinals) else {
            return Ok(datasets);
        };
        let backend = crate::device::backend();
        let copies = crate::device::place(&datasets, &ordinals, spec, backend.as_ref())?;
        Ok(datasets.with_devices(copies))
    }

    /// The server's settings from these flags (the token file read now).
    pub fn options(&self) -> anyhow::Result<crate::server::ServerOptions> {
        let a = self;
        Ok(crate::server::ServerOptions {
            limits: Limits {
                max_batch_size: a.max_batch_size,
                max_message_bytes: a.max_message_bytes,
                chunk_bytes: a.chunk_bytes,
                budget_bytes: a.memory_budget_bytes,
                budget_wait: a.budget_wait_secs,
                budget_stall: a.budget_stall_secs,
                request_timeout: a.request_timeout_secs,
            },
            shutdown_grace: a.shutdown_grace_secs,
            eager_stats: true,
            max_connections: a.max_connections,
            max_concurrent_streams: a.max_concurrent_streams,
            io_threads: a.io_threads,
            keepalive_interval: a.keepalive_secs.max(Duration::from_secs(1)),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: a.handshake_timeout_secs,
            auth_token: match (&a.auth_token_file, &a.auth_token) {
                (Some(f), _) => Some(crate::access::read_token_file(f)?),
                (None, t) => t.clone(),
            },
            tls: a
                .tls_cert
                .clone()
                .zip(a.tls_key.clone())
                .map(|(cert, key)| crate::access::TlsFiles {
                    cert,
                    key,
                    client_ca: a.tls_client_ca.clone(),
                }),
            uds: a
                .uds
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|path| crate::server::UdsOptions {
                    path: path.clone(),
                    mode: a.uds_mode,
                    group: a.uds_group.clone().filter(|g| !g.is_empty()),
                }),
            uds_backlog: a.listen_backlog,
            max_attached: a.max_attached,
        })
    }

    /// Whether to lock the dataset in RAM.
    pub fn pin(&self) -> PinPolicy {
        if self.no_pin {
            PinPolicy::Off
        } else if self.require_pinned {
            PinPolicy::Require
        } else {
            PinPolicy::Try
        }
    }
}

impl BenchArgs {
    /// The load these flags describe.
    pub fn spec(&self) -> LoadSpec {
        LoadSpec {
            server: self.client.server.clone(),
            client: self.client.options(),
            method: match self.method {
                BenchMethod::GetBatch => Method::GetBatch,
                BenchMethod::StreamBatches => Method::StreamBatches,
            },
            dataset: self.dataset.clone(),
            set: self.set.clone(),
            size: self.size,
            x_dtype: self.x_dtype,
            shuffle: self.shuffle,
            concurrency: self.concurrency,
            count: self.count,
            duration: self.duration,
        }
    }
}

/// Parses a number of seconds for a duration flag: finite, not negative,
/// at most [`crate::server::MAX_DURATION`] (`Duration::from_secs_f64`
/// panics on infinity and on overflow, and `1e30` seconds is a typo).
pub fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let max = crate::server::MAX_DURATION;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "{s} is not a finite, non-negative number of seconds"
        ));
    }
    if v > max.as_secs_f64() {
        return Err(format!(
            "{s} s is more than the {} s (a day) allowed",
            max.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--uds` is off by default and when empty; its mode is octal.
    #[test]
    fn uds_flags() {
        let serve = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["minibatchd", "serve"], args].concat())?;
            let Cmd::Serve(a) = cli.cmd else {
                unreachable!()
            };
            Ok::<_, clap::Error>(a.options().unwrap())
        };
        assert_eq!(serve(&[]).unwrap().uds, None);
        assert_eq!(serve(&["--uds", ""]).unwrap().uds, None);
        let u = serve(&["--uds", "/run/m.sock"]).unwrap().uds.unwrap();
        assert_eq!(u, crate::server::UdsOptions::new("/run/m.sock"));
        assert_eq!(u.mode, 0o660);
        let o = serve(&[
            "--uds",
            "/run/m.sock",
            "--uds-mode",
            "0600",
            "--uds-group",
            "train",
        ])
        .unwrap();
        let u = o.uds.unwrap();
        assert_eq!((u.mode, u.group.as_deref()), (0o600, Some("train")));
        for bad in ["888", "1777", "", "rw"] {
            assert!(serve(&["--uds", "/x", "--uds-mode", bad]).is_err(), "{bad}");
        }
    }

    /// `--data` specs: repeatable, NAME=PATH or PATH, empty values ignored.
    #[test]
    fn data_specs() {
        let specs = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["minibatchd", "serve"], args].concat()).unwrap();
            let Cmd::Serve(a) = cli.cmd else {
                unreachable!()
            };
            a.load.specs()
        };
        let spec = |name: &str, path: &str| DataSpec {
            name: name.into(),
            path: path.into(),
        };
        assert_eq!(specs(&[]).unwrap(), vec![]);
        assert_eq!(specs(&["--data", ""]).unwrap(), vec![]);
        assert_eq!(
            specs(&[
                "--data",
                "/d/mnist.pkl.gz",
                "--data",
                "fashion=/d/fashion",
                "--data",
                "./a=b.npz",
                "--data",
                "/d/x=y",
            ])
            .unwrap(),
            vec![
                spec("mnist", "/d/mnist.pkl.gz"),
                spec("fashion", "/d/fashion"),
                spec("a-b", "./a=b.npz"),
                spec("x-y", "/d/x=y"),
            ]
        );
        // The environment's form: comma-separated.
        assert_eq!(
            specs(&["--data", "a=/x.npz,b=/y.npz"]).unwrap(),
            vec![spec("a", "/x.npz"), spec("b", "/y.npz")]
        );
        for (bad, why) in [
            ("my data=/x.npz", "not valid"),
            ("-x=/x.npz", "not valid"),
            ("a=", "no path"),
            ("=/x.npz", "empty"),
        ] {
            let e = specs(&[&format!("--data={bad}")]).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    /// The duration flags' defaults (strings, for clap) are the library's.
    #[test]
    fn duration_defaults_are_the_librarys() {
        let cli = Cli::try_parse_from(["minibatchd", "serve"]).unwrap();
        let Cmd::Serve(a) = cli.cmd else {
            unreachable!()
        };
        let o = a.options().unwrap();
        let l = Limits::default();
        assert_eq!(o.limits.budget_wait, l.budget_wait);
        assert_eq!(o.limits.budget_stall, l.budget_stall);
        assert_eq!(o.limits.request_timeout, l.request_timeout);
        assert_eq!(o.limits.budget_bytes, l.budget_bytes);
        let d = crate::server::ServerOptions::default();
        assert_eq!(o.shutdown_grace, d.shutdown_grace);
        assert_eq!(o.handshake_timeout, d.handshake_timeout);
        assert_eq!(o.keepalive_interval, d.keepalive_interval);
    }

    #[test]
    fn durations_must_be_finite_sane_seconds() {
        assert_eq!(secs("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["inf", "NaN", "-1", "1e30", "abc"] {
            assert!(secs(bad).is_err(), "{bad}");
        }
    }
}
