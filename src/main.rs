//! Thin CLI: configuration, logging, then a library call.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

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
    #[arg(long, env = "MINIBATCHD_CHUNK_BYTES", default_value_t = minibatchd::wire::DEFAULT_CHUNK_BYTES)]
    chunk_bytes: usize,
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
    async fn connect(&self) -> anyhow::Result<Client> {
        // Without a CA the connection is plaintext, and the certificate
        // would silently go unused: a mistake, not a choice.
        if self.tls_ca.is_none() && self.tls_client_cert.is_some() {
            anyhow::bail!(
                "--tls-client-cert/--tls-client-key need --tls-ca (MINIBATCHD_TLS_CA): without it the connection is plaintext and the client certificate would not be sent"
            );
        }
        let o = minibatchd::client::ClientOptions {
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
            tls_domain: self.tls_domain.clone(),
        };
        Ok(Client::connect_with(&self.server, &o).await?)
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
    x_dtype: Option<WireDType>,
    /// Wire dtype of y (int32); default as stored.
    #[arg(long)]
    y_dtype: Option<WireDType>,
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

#[derive(Clone, Copy, ValueEnum)]
enum WireDType {
    Float32,
    Float16,
    Bfloat16,
    Uint8,
    Int32,
    Int64,
}

impl From<WireDType> for DType {
    fn from(w: WireDType) -> DType {
        match w {
            WireDType::Float32 => DType::F32,
            WireDType::Float16 => DType::F16,
            WireDType::Bfloat16 => DType::BF16,
            WireDType::Uint8 => DType::U8,
            WireDType::Int32 => DType::I32,
            WireDType::Int64 => DType::I64,
        }
    }
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
    #[arg(long)]
    x_dtype: Option<WireDType>,
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
    let mut sets = Vec::new();
    for s in &ds.sets {
        let t = |name: &str, t: &minibatchd::store::Tensor| {
            let st = stats.get(&s.name, name).expect("stats for every tensor");
            let mut v = serde_json::to_value(st).expect("stats serialize");
            v["dtype"] = t.dtype.name().into();
            v["shape"] = t.shape.clone().into();
            v["wire_dtypes"] = minibatchd::wire::wire_dtypes(t, st)
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .into();
            v
        };
        sets.push(serde_json::json!({
            "name": s.name, "examples": s.examples(), "x": t("x", &s.x), "y": t("y", &s.y),
        }));
    }
    let out = serde_json::json!({
        "source": ds.source, "format": ds.format.name(), "fingerprint": stats.fingerprint,
        "tensor_bytes": ds.tensor_bytes(), "memory_bytes": ds.memory_bytes,
        "load_ms": load_ms, "total_ms": t0.elapsed().as_secs_f64() * 1e3, "sets": sets,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("source      {} ({})", ds.source, ds.format.name());
    println!("fingerprint {}", stats.fingerprint);
    println!(
        "memory      {} bytes of tensors, {} bytes held; loaded in {:.1} ms",
        ds.tensor_bytes(),
        ds.memory_bytes,
        load_ms
    );
    for s in &sets {
        println!(
            "\nset {} — {} examples",
            s["name"].as_str().unwrap_or(""),
            s["examples"]
        );
        for k in ["x", "y"] {
            let t = &s[k];
            println!(
                "  {k}: {} {}  sha256 {}",
                t["dtype"].as_str().unwrap_or(""),
                t["shape"],
                t["sha256"].as_str().unwrap_or("")
            );
            println!(
                "     range [{}, {}]  wire dtypes {}",
                t["min"], t["max"], t["wire_dtypes"]
            );
            if t["dtype"].as_str().is_some_and(|d| d.starts_with("float")) {
                println!(
                    "     multiples of 1/256: {}  of 1/255: {}",
                    t["multiple_of_1_256"], t["multiple_of_1_255"]
                );
            }
            if let Some(h) = t["histogram"].as_object() {
                let hs: Vec<String> = h.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                println!("     labels {}", hs.join(" "));
            }
        }
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
    let mut c = a.connect().await?;
    let i = c.info().await?;
    let dt = |v: i32| {
        minibatchd::proto::Dtype::try_from(v)
            .map(|d| d.as_str_name().trim_start_matches("DTYPE_").to_lowercase())
            .unwrap_or_default()
    };
    say!(
        "source {} ({}), fingerprint {}",
        i.source,
        i.format,
        i.fingerprint
    );
    say!(
        "memory {} bytes, pinned: {}, server {}",
        i.memory_bytes,
        i.pinned,
        i.server_version
    );
    if let Some(l) = i.limits {
        say!(
            "limits: max batch {}, max message {} bytes, chunk {} bytes",
            l.max_batch_size,
            l.max_message_bytes,
            l.chunk_bytes
        );
    }
    for s in &i.sets {
        let x = s.x.clone().unwrap_or_default();
        let y = s.y.clone().unwrap_or_default();
        say!(
            "  {:<6} {:>7} examples  x {} {:?} (wire: {})  y {} {:?}  classes {:?}",
            s.name,
            s.examples,
            dt(x.dtype),
            x.shape,
            x.wire_dtypes
                .iter()
                .map(|&d| dt(d))
                .collect::<Vec<_>>()
                .join(","),
            dt(y.dtype),
            y.shape,
            s.classes
        );
    }
    Ok(())
}

async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut c = a.client.connect().await?;
    let mut r = BatchRequest::new(&a.set, a.index, a.size);
    r.x_dtype = a.x_dtype.map(Into::into);
    r.y_dtype = a.y_dtype.map(Into::into);
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
            std::fs::write(&p, npy(t)).with_context(|| format!("writing {}", p.display()))?;
            say!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// NumPy .npy (format 1.0) bytes of a tensor.
fn npy(t: &minibatchd::client::TensorData) -> Vec<u8> {
    let descr = match t.dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::BF16 => "<u2", // numpy has no bfloat16: raw 16-bit words
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
    };
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", shape[0])
    } else {
        format!("({})", shape.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.data);
    out
}

async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let mut probe = a.client.connect().await?;
    let info = probe.info().await?;
    let n = info
        .sets
        .iter()
        .find(|s| s.name == a.set)
        .map(|s| s.examples)
        .with_context(|| format!("no set {:?}", a.set))?;
    let batches = n.div_ceil(a.size as u64).max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.concurrency.max(1) {
        let (client, set, method, count) = (a.client.clone(), a.set.clone(), a.method, a.count);
        let (total, bytes) = (total.clone(), bytes.clone());
        let x_dtype = a.x_dtype.map(DType::from);
        let (size, shuffle) = (a.size, a.shuffle);
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await?;
            let mut lat = Vec::new();
            let mut i = w as u64 % batches;
            let more = |total: &std::sync::atomic::AtomicU64| {
                if count > 0 {
                    total.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count
                } else {
                    total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Instant::now() < deadline
                }
            };
            let mut r = BatchRequest::new(&set, 0, size);
            r.x_dtype = x_dtype;
            r.order.shuffle = shuffle;
            'outer: loop {
                match method {
                    BenchMethod::GetBatch => {
                        if !more(&total) {
                            break;
                        }
                        r.index = i;
                        let s = Instant::now();
                        let b = c.get_batch(&r).await?;
                        lat.push(s.elapsed());
                        bytes.fetch_add(
                            (b.x.data.len() + b.y.data.len()) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        i = (i + 1) % batches;
                    }
                    BenchMethod::StreamBatches => {
                        r.index = 0;
                        use tokio_stream::StreamExt;
                        let mut st = c.stream_batches(&r).await?;
                        let mut s = Instant::now();
                        while let Some(b) = st.next().await {
                            let b = b?;
                            lat.push(s.elapsed());
                            s = Instant::now();
                            bytes.fetch_add(
                                (b.x.data.len() + b.y.data.len()) as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            if !more(&total) {
                                break 'outer;
                            }
                        }
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let progress = {
        let (total, bytes) = (total.clone(), bytes.clone());
        let json = a.json;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !json {
                    let s = t0.elapsed().as_secs_f64();
                    eprint!(
                        "\r{:>6.1} s  {} minibatches  {:.1} MB/s   ",
                        s,
                        total.load(std::sync::atomic::Ordering::Relaxed),
                        bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / s / 1e6
                    );
                }
            }
        })
    };
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    progress.abort();
    let secs = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0)
    };
    let b = bytes.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let res = serde_json::json!({
        "method": match a.method { BenchMethod::GetBatch => "GetBatch", BenchMethod::StreamBatches => "StreamBatches" },
        "set": a.set, "size": a.size, "concurrency": a.concurrency, "minibatches": lat.len(), "seconds": secs,
        "minibatches_per_s": lat.len() as f64 / secs, "mb_per_s": b / secs / 1e6,
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
    });
    if a.json {
        say!("{res}");
    } else {
        eprintln!();
        say!(
            "{} size {} x{}: {} minibatches in {:.2} s = {:.1} minibatches/s, {:.1} MB/s; latency p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms",
            res["method"].as_str().unwrap_or(""),
            a.size,
            a.concurrency,
            lat.len(),
            secs,
            lat.len() as f64 / secs,
            b / secs / 1e6,
            pct(0.5),
            pct(0.9),
            pct(0.99)
        );
    }
    Ok(())
}
