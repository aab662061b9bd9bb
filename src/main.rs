//! Thin CLI: configuration, logging, then a library call.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use minibatchd::cli::inspect::Report;
use minibatchd::cli::loadgen::{LoadSpec, Method};
use minibatchd::cli::npy::npy;
use minibatchd::client::{BatchRequest, Client};
use minibatchd::load::{self, LoadOptions, PinPolicy};
use minibatchd::service::{Limits, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_MESSAGE_BYTES};
use minibatchd::store::{DType, Dataset};

#[derive(Parser)]
#[command(
    name = "minibatchd",
    version,
    about = "Loads a training dataset once into pinned memory and serves minibatches over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "MINIBATCHD_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "minibatchd=debug").
    #[arg(long, global = true, env = "MINIBATCHD_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load a dataset and serve it over gRPC.
    Serve(ServeArgs),
    /// Load a dataset and describe it: sets, shapes, dtypes, ranges, sha256s.
    Inspect(InspectArgs),
    /// Ask a server for its dataset description (GetInfo).
    Info(ClientArgs),
    /// Fetch one minibatch; print a summary or write .npy files.
    Get(GetArgs),
    /// Check a server's gRPC health; exit 0 when SERVING (for container probes).
    Health(ClientArgs),
    /// Load generator: fetch minibatches and report throughput and latency.
    Bench(BenchArgs),
    /// Benchmark helper: only inflate a gzip file with the loader's
    /// decompressor (the floor a load is compared with).
    #[command(hide = true)]
    Inflate { path: PathBuf },
}

#[derive(Args)]
struct LoadArgs {
    /// Dataset: a gzip'd or plain pickle in mnist.pkl.gz's layout, or a
    /// directory of MNIST IDX files. Default: the bundled sample of 5,000 real
    /// MNIST digits (3,000 / 1,000 / 1,000).
    #[arg(long, env = "MINIBATCHD_DATA")]
    data: Option<PathBuf>,
    /// IDX directories only: how many of the official training images (the
    /// last ones) become the validation set (10,000 = the tutorial's split).
    #[arg(long, env = "MINIBATCHD_VALID_SPLIT", default_value_t = 10_000)]
    valid_split: usize,
    /// Refuse datasets that inflate beyond this many bytes (default: 3/4 of RAM).
    #[arg(long, env = "MINIBATCHD_MAX_DATASET_BYTES")]
    max_dataset_bytes: Option<usize>,
}

impl LoadArgs {
    fn load(&self, pin: PinPolicy) -> anyhow::Result<Dataset> {
        let opts = LoadOptions {
            max_bytes: self
                .max_dataset_bytes
                .unwrap_or_else(load::default_max_bytes),
            valid_split: self.valid_split,
            pin,
        };
        // An empty MINIBATCHD_DATA (compose files often pass one) means "unset".
        Ok(
            match self.data.as_ref().filter(|p| !p.as_os_str().is_empty()) {
                Some(p) => load::load(p, &opts)?,
                None => {
                    tracing::info!(
                        "no --data given: using the bundled sample ({})",
                        minibatchd::BUNDLED_SAMPLE_NAME
                    );
                    load::load_bytes(
                        Path::new(minibatchd::BUNDLED_SAMPLE_NAME),
                        minibatchd::BUNDLED_SAMPLE,
                        &opts,
                    )?
                }
            },
        )
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// gRPC listen address.
    #[arg(long, env = "MINIBATCHD_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Prometheus metrics listen address (HTTP, GET /metrics); "off" disables.
    #[arg(
        long,
        env = "MINIBATCHD_METRICS_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    metrics_addr: String,
    /// Largest minibatch (examples) a request may ask for.
    #[arg(long, env = "MINIBATCHD_MAX_BATCH_SIZE", default_value_t = DEFAULT_MAX_BATCH_SIZE)]
    max_batch_size: usize,
    /// Largest gRPC message sent or accepted (4 MiB keeps stock clients working).
    #[arg(long, env = "MINIBATCHD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Largest tensor data per message; must leave 1 KiB of the message size for other fields.
    #[arg(long, env = "MINIBATCHD_CHUNK_BYTES", default_value_t = minibatchd::service::DEFAULT_CHUNK_BYTES)]
    chunk_bytes: usize,
    /// Bytes all requests together may hold in gathered or converted chunks
    /// (shuffled, sharded or narrowed minibatches); more waits, then is
    /// refused with RESOURCE_EXHAUSTED. Contiguous float32 minibatches are
    /// slices of the dataset and take none.
    #[arg(long, env = "MINIBATCHD_MEMORY_BUDGET_BYTES", default_value_t = minibatchd::batch::budget::DEFAULT_BUDGET_BYTES)]
    memory_budget_bytes: usize,
    /// Seconds a lease of memory budget may stay unsent while other streams
    /// wait for budget before its connection is closed (never-read streams).
    #[arg(long, env = "MINIBATCHD_BUDGET_STALL_SECS", default_value_t = minibatchd::batch::budget::DEFAULT_STALL.as_secs_f64())]
    budget_stall_secs: f64,
    /// Seconds a chunk may wait for memory budget before its stream is refused.
    #[arg(long, env = "MINIBATCHD_BUDGET_WAIT_SECS", default_value_t = minibatchd::batch::budget::DEFAULT_BUDGET_WAIT.as_secs_f64())]
    budget_wait_secs: f64,
    /// Seconds a request message may take to arrive after its headers.
    #[arg(long, env = "MINIBATCHD_REQUEST_TIMEOUT_SECS", default_value_t = minibatchd::service::DEFAULT_REQUEST_TIMEOUT.as_secs_f64())]
    request_timeout_secs: f64,
    /// Fail start-up if the dataset memory cannot be locked in RAM.
    #[arg(long, env = "MINIBATCHD_REQUIRE_PINNED", conflicts_with = "no_pin")]
    require_pinned: bool,
    /// Do not try to lock the dataset memory.
    #[arg(long, env = "MINIBATCHD_NO_PIN")]
    no_pin: bool,
    /// Seconds in-flight streams may continue after SIGTERM/SIGINT (at most a day).
    #[arg(long, env = "MINIBATCHD_SHUTDOWN_GRACE_SECS", default_value = "30", value_parser = secs)]
    shutdown_grace_secs: Duration,
    /// Connections served at once; more are closed at accept, unless one has
    /// not completed its handshake: the oldest such is closed instead.
    #[arg(long, env = "MINIBATCHD_MAX_CONNECTIONS", default_value_t = minibatchd::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds from accept to the HTTP/2 preface (TLS handshake included);
    /// slower connections are closed and free their slot.
    #[arg(long, env = "MINIBATCHD_HANDSHAKE_TIMEOUT_SECS", default_value = "5", value_parser = secs)]
    handshake_timeout_secs: Duration,
    /// Listen backlog of the gRPC socket: connections queued before accept
    /// (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "MINIBATCHD_LISTEN_BACKLOG", default_value_t = minibatchd::server::DEFAULT_LISTEN_BACKLOG, value_parser = clap::value_parser!(u32).range(1..))]
    listen_backlog: u32,
    /// Metrics connections served at once; more wait in the listen backlog.
    #[arg(long, env = "MINIBATCHD_METRICS_MAX_CONNECTIONS", default_value_t = minibatchd::metrics::DEFAULT_METRICS_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    metrics_max_connections: usize,
    /// RPCs one connection may have in flight (HTTP/2 max concurrent streams).
    #[arg(long, env = "MINIBATCHD_MAX_CONCURRENT_STREAMS", default_value_t = minibatchd::server::DEFAULT_MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    /// Serving threads (each serves whole connections on its own
    /// single-threaded runtime); 0 = one per CPU.
    #[arg(long, env = "MINIBATCHD_IO_THREADS", default_value_t = 0)]
    io_threads: usize,
    /// Seconds between HTTP/2 keepalive pings (at least 1, at most a day); a
    /// peer silent for 10 s more is dropped.
    #[arg(long, env = "MINIBATCHD_KEEPALIVE_SECS", default_value = "30", value_parser = secs)]
    keepalive_secs: Duration,
    /// Require "authorization: Bearer <token>" on BatchService calls; the token
    /// is this file's content (health stays open for probes).
    #[arg(
        long,
        env = "MINIBATCHD_AUTH_TOKEN_FILE",
        conflicts_with = "auth_token"
    )]
    auth_token_file: Option<PathBuf>,
    /// The bearer token itself (prefer the file: environments leak into process listings less, files into none).
    #[arg(long, env = "MINIBATCHD_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "MINIBATCHD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "MINIBATCHD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    /// Dataset file or IDX directory (default: the bundled sample).
    path: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 10_000)]
    valid_split: usize,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Server address.
    #[arg(long, env = "MINIBATCHD_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    /// Bearer token, if the server asks for one.
    #[arg(long, env = "MINIBATCHD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate that signed the server's (turns TLS on).
    #[arg(long, env = "MINIBATCHD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "MINIBATCHD_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Server name to verify (default: the host in --server).
    #[arg(long, env = "MINIBATCHD_TLS_DOMAIN")]
    tls_domain: Option<String>,
}

impl ClientArgs {
    fn options(&self) -> minibatchd::client::ClientOptions {
        minibatchd::client::ClientOptions {
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
            tls_domain: self.tls_domain.clone(),
        }
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect_with(&self.server, &self.options()).await?)
    }
}

#[derive(Args)]
struct GetArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, default_value = "train")]
    set: String,
    #[arg(long, default_value_t = 0)]
    index: u64,
    #[arg(long, default_value_t = 500)]
    size: u32,
    /// Wire dtype of x (float32, uint8, float16, bfloat16); default as stored.
    #[arg(long)]
    x_dtype: Option<DType>,
    /// Wire dtype of y (int32); default as stored.
    #[arg(long)]
    y_dtype: Option<DType>,
    #[arg(long)]
    shuffle: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    #[arg(long, default_value_t = 0)]
    world_size: u32,
    /// Write x.npy and y.npy into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum BenchMethod {
    GetBatch,
    StreamBatches,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long, value_enum, default_value = "get-batch")]
    method: BenchMethod,
    #[arg(long, default_value = "train")]
    set: String,
    #[arg(long, default_value_t = 500)]
    size: u32,
    /// Concurrent clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Stop after this many minibatches in all (0 = run for --duration).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Seconds to run when --count is 0.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Wire dtype of x (float32, uint8, float16, bfloat16); default as stored.
    #[arg(long)]
    x_dtype: Option<DType>,
    #[arg(long)]
    shuffle: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// mimalloc instead of glibc malloc: minibatch-sized buffers (MBs, freed at
/// once) sent glibc to mmap and back per minibatch, and page faults were a
/// third of a client's time (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Inspect(_)) {
        // `inspect | head` should end quietly when the reader leaves, as
        // Unix tools do, not panic on EPIPE. Only inspect: the commands that
        // talk to a server keep SIGPIPE ignored, or a server that resets the
        // connection kills them by signal with no message (`health` exited
        // -13 in 14 of 30 tries against a full server); their output goes
        // through `say!`, which ends them the same way when stdout's reader
        // leaves.
        // SAFETY: restoring the default disposition of one signal at start-up.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_tracing(cli.log_format, &cli.log);
    let r = match cli.cmd {
        Cmd::Inspect(a) => inspect(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Health(a) => rt().and_then(|rt| rt.block_on(health(a))),
        Cmd::Info(a) => rt().and_then(|rt| rt.block_on(info(a))),
        Cmd::Get(a) => rt().and_then(|rt| rt.block_on(get(a))),
        Cmd::Bench(a) => rt().and_then(|rt| rt.block_on(bench(a))),
        Cmd::Inflate { path } => inflate(&path),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `println!` for the client commands (see `main` on SIGPIPE): when the
/// reader of their stdout leaves (`info | head -1`), they end as a Unix
/// tool does, by SIGPIPE, instead of panicking on EPIPE.
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

fn say(args: std::fmt::Arguments) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // SAFETY: default disposition, then the signal to ourselves.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Parses a number of seconds for a duration flag: finite, not negative,
/// at most [`minibatchd::server::MAX_DURATION`] (`Duration::from_secs_f64`
/// panics on infinity and on overflow, and `1e30` seconds is a typo).
fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let max = minibatchd::server::MAX_DURATION;
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

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// A current-thread runtime: on 2 cores it beat a multi-thread one for clients.
fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let pin = if a.no_pin {
        PinPolicy::Off
    } else if a.require_pinned {
        PinPolicy::Require
    } else {
        PinPolicy::Try
    };
    let opts = minibatchd::server::ServerOptions {
        limits: Limits {
            max_batch_size: a.max_batch_size,
            max_message_bytes: a.max_message_bytes,
            chunk_bytes: a.chunk_bytes,
            budget_bytes: a.memory_budget_bytes,
            budget_wait: seconds("--budget-wait-secs", a.budget_wait_secs)?,
            budget_stall: seconds("--budget-stall-secs", a.budget_stall_secs)?,
            request_timeout: seconds("--request-timeout-secs", a.request_timeout_secs)?,
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
            (Some(f), _) => Some(minibatchd::access::read_token_file(f)?),
            (None, t) => t.clone(),
        },
        tls: a
            .tls_cert
            .clone()
            .zip(a.tls_key.clone())
            .map(|(cert, key)| minibatchd::access::TlsFiles {
                cert,
                key,
                client_ca: a.tls_client_ca.clone(),
            }),
    };
    minibatchd::server::validate(&opts).map_err(anyhow::Error::msg)?;
    let metrics_conns = if a.metrics_addr == "off" || a.metrics_addr.is_empty() {
        0
    } else {
        a.metrics_max_connections
    };
    minibatchd::server::make_room_for_fds(minibatchd::server::fds_needed(&opts, metrics_conns));
    let ds = Arc::new(a.load.load(pin)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = minibatchd::server::bind(&a.addr, a.listen_backlog)
            .await
            .with_context(|| format!("cannot listen on {}", a.addr))?;
        let metrics = Arc::new(minibatchd::metrics::Metrics::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if a.metrics_addr != "off" && !a.metrics_addr.is_empty() {
            let ml = tokio::net::TcpListener::bind(&a.metrics_addr)
                .await
                .with_context(|| format!("cannot listen on {} (metrics)", a.metrics_addr))?;
            tracing::info!(addr = %ml.local_addr()?, "serving metrics at /metrics");
            let mut rx = stop_rx.clone();
            tokio::spawn(minibatchd::metrics::serve(
                ml,
                metrics.clone(),
                a.metrics_max_connections,
                async move {
                    let _ = rx.changed().await;
                },
            ));
        }
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        minibatchd::server::run(listener, ds, opts, metrics, shutdown).await
    })
}

/// A duration flag in seconds: finite, not negative, at most a day (as
/// f64 seconds, 1e30 or inf would panic in `Duration`).
fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    const MAX: f64 = 86_400.0;
    if !(0.0..=MAX).contains(&s) {
        anyhow::bail!("{flag} {s} is not a number of seconds between 0 and {MAX}");
    }
    Ok(Duration::from_secs_f64(s))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let la = LoadArgs {
        data: a.path.clone(),
        valid_split: a.valid_split,
        max_dataset_bytes: None,
    };
    let ds = la.load(PinPolicy::Off)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let stats = minibatchd::analyze::dataset_stats(&ds);
    let report = Report::new(&ds, &stats, load_ms, t0.elapsed().as_secs_f64() * 1e3);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn inflate(path: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let out = minibatchd::load::gzip::inflate(&raw, load::default_max_bytes())
        .map_err(|at| anyhow::anyhow!("{}: byte {}: {}", path.display(), at.offset, at.what))?;
    println!(
        "{} bytes in {:.1} ms",
        out.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

async fn health(a: ClientArgs) -> anyhow::Result<()> {
    let mut c = tokio::time::timeout(Duration::from_secs(5), a.connect())
        .await
        .context("connect timed out")??;
    if tokio::time::timeout(Duration::from_secs(5), c.health())
        .await
        .context("health check timed out")??
    {
        say!("SERVING");
        Ok(())
    } else {
        anyhow::bail!("NOT_SERVING")
    }
}

async fn info(a: ClientArgs) -> anyhow::Result<()> {
    let i = a.connect().await?.info().await?;
    say!("{}", minibatchd::cli::info::table(&i).trim_end());
    Ok(())
}

async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut c = a.client.connect().await?;
    let mut r = BatchRequest::new(&a.set, a.index, a.size);
    r.x_dtype = a.x_dtype;
    r.y_dtype = a.y_dtype;
    r.order = minibatchd::proto::Order {
        shuffle: a.shuffle,
        seed: a.seed,
        epoch: a.epoch,
        rank: a.rank,
        world_size: a.world_size,
        drop_last: false,
    };
    let t0 = Instant::now();
    let b = c.get_batch(&r).await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for t in [&b.x, &b.y] {
        say!(
            "{}: {} {:?} {} bytes sha256 {}{}",
            t.name,
            t.dtype,
            t.shape,
            t.data.len(),
            minibatchd::analyze::sha256_hex(&t.data),
            if t.scale_divisor > 0 {
                format!(" (value = byte / {})", t.scale_divisor)
            } else {
                String::new()
            }
        );
    }
    say!("minibatch {} of set {} in {ms:.2} ms", b.index, a.set);
    if let Some(dir) = a.out {
        std::fs::create_dir_all(&dir)?;
        for t in [&b.x, &b.y] {
            let p = dir.join(format!("{}.npy", t.name));
            std::fs::write(&p, npy(t.dtype, &t.shape, &t.data))
                .with_context(|| format!("writing {}", p.display()))?;
            say!("wrote {}", p.display());
        }
    }
    Ok(())
}

async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let spec = LoadSpec {
        server: a.client.server.clone(),
        client: a.client.options(),
        method: match a.method {
            BenchMethod::GetBatch => Method::GetBatch,
            BenchMethod::StreamBatches => Method::StreamBatches,
        },
        set: a.set,
        size: a.size,
        x_dtype: a.x_dtype,
        shuffle: a.shuffle,
        concurrency: a.concurrency,
        count: a.count,
        duration: seconds("--duration", a.duration)?,
    };
    let report = minibatchd::cli::loadgen::run(spec, !a.json).await?;
    if a.json {
        say!("{}", serde_json::to_string(&report)?);
    } else {
        say!("{}", report.line());
    }
    Ok(())
}
