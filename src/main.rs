//! Thin CLI: configuration, logging, then a library call.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;

use minibatchd::cli::args::{
    BenchArgs, Cli, ClientArgs, Cmd, GetArgs, InfoArgs, InspectArgs, LoadArgs, LogFormat, ServeArgs,
};
use minibatchd::cli::inspect::Report;
use minibatchd::cli::npy::npy;
use minibatchd::client::BatchRequest;
use minibatchd::load::{self, PinPolicy};
use minibatchd::memory::Backing;

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
        Cmd::Serve(a) => serve(*a),
        Cmd::Health(a) => rt().and_then(|rt| rt.block_on(health(a))),
        Cmd::Info(a) => rt().and_then(|rt| rt.block_on(info(a))),
        Cmd::Get(a) => rt().and_then(|rt| rt.block_on(get(a))),
        Cmd::Bench(a) => rt().and_then(|rt| rt.block_on(bench(a))),
        Cmd::Status(a) => rt().and_then(|rt| {
            rt.block_on(minibatchd::cli::status::run(&a, |s| {
                minibatchd::cli::say(format_args!("{s}"))
            }))
        }),
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
        minibatchd::cli::say(format_args!($($arg)*))
    };
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
    let opts = a.options()?;
    minibatchd::server::validate(&opts).map_err(anyhow::Error::msg)?;
    let metrics_conns = if a.metrics_addr == "off" || a.metrics_addr.is_empty() {
        0
    } else {
        a.metrics_max_connections
    };
    minibatchd::server::make_room_for_fds(minibatchd::server::fds_needed(&opts, metrics_conns));
    // Memory other processes can map only when some can attach (--uds).
    let backing = if opts.uds.is_some() {
        Backing::Shared
    } else {
        Backing::Private
    };
    let ds = a.datasets(backing)?;
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
        data: Vec::new(),
        valid_split: a.valid_split,
        max_dataset_bytes: None,
    };
    let ds = la.load(a.path.as_deref(), PinPolicy::Off, Backing::Private)?;
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
    let out = minibatchd::load::gzip::inflate(&raw, load::default_max_bytes(), Backing::Private)
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

async fn info(a: InfoArgs) -> anyhow::Result<()> {
    let i = a.client.connect().await?.info_of(&a.dataset).await?;
    let table = minibatchd::cli::info::table(&i, !a.dataset.is_empty());
    say!("{}", table.trim_end());
    Ok(())
}

async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut c = a.client.connect().await?;
    let mut r = BatchRequest::new(&a.set, a.index, a.size);
    r.dataset = a.dataset.clone();
    r.x_dtype = a.x_dtype;
    r.y_dtype = a.y_dtype;
    r.order = minibatchd::proto::Order {
        shuffle: a.shuffle,
        seed: a.seed,
        epoch: a.epoch,
        rank: a.rank,
        world_size: a.world_size,
        drop_last: false,
        offset: a.offset,
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
    if let Some(p) = &a.png {
        let png = minibatchd::status::png::of_batch(&b).map_err(|e| {
            anyhow::anyhow!("cannot draw minibatch {} of set {}: {e}", b.index, a.set)
        })?;
        std::fs::write(p, png).with_context(|| format!("writing {}", p.display()))?;
        say!("wrote {}", p.display());
    }
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
    let report = minibatchd::cli::loadgen::run(a.spec(), !a.json).await?;
    if a.json {
        say!("{}", serde_json::to_string(&report)?);
    } else {
        say!("{}", report.line());
    }
    Ok(())
}
