//! `minibatchd status`: the daemon's `/status.json` (on its metrics
//! address) as tables: datasets, throughput, open streams; `--watch SECS`
//! redraws it.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::page::{age, bytes, rate, stream_cells};
use crate::status::Snapshot;

/// Largest `/status.json` read: 256 listed and 32 finished streams are
/// ~150 KB; 8 MiB leaves room for many datasets and still bounds what a
/// wrong address can make the CLI buffer.
pub const MAX_STATUS_BYTES: usize = 8 << 20;
/// Connecting, asking and reading, all together.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `--watch` interval: an hour (a longer one is a typo).
pub const MAX_WATCH_SECS: f64 = 3600.0;

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The daemon's metrics address (its `serve --metrics-addr`).
    #[arg(
        long,
        env = "MINIBATCHD_METRICS_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub metrics_addr: String,
    /// Bearer token, if the daemon has one (`serve --auth-token`).
    #[arg(long, env = "MINIBATCHD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file instead.
    #[arg(long, env = "MINIBATCHD_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Redraw every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
    /// Print the JSON as the daemon sent it (once).
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
}

impl StatusArgs {
    fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.token_file {
            Some(p) => Ok(Some(crate::access::read_token_file(p)?)),
            None => Ok(self.token.clone()),
        }
    }

    /// The `--watch` interval, checked.
    pub fn interval(&self) -> anyhow::Result<Option<Duration>> {
        match self.watch {
            None => Ok(None),
            Some(s) if s.is_finite() && s > 0.0 && s <= MAX_WATCH_SECS => {
                Ok(Some(Duration::from_secs_f64(s)))
            }
            Some(s) => anyhow::bail!("--watch {s}: give seconds above 0, at most {MAX_WATCH_SECS}"),
        }
    }
}

/// GETs `path` from `addr` over HTTP/1.1: the body of a 200, else an error
/// with the status line and the daemon's message.
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr} (the daemon's --metrics-addr)"))?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_STATUS_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .await?;
        anyhow::ensure!(
            buf.len() <= MAX_STATUS_BYTES,
            "{addr}{path}: the answer exceeds {MAX_STATUS_BYTES} bytes"
        );
        Ok::<_, anyhow::Error>(buf)
    };
    let buf = tokio::time::timeout(STATUS_TIMEOUT, work)
        .await
        .with_context(|| format!("{addr}{path}: no answer within {STATUS_TIMEOUT:?}"))??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{addr}{path}: not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head.lines().next().unwrap_or_default().to_string();
    let body = buf[split + 4..].to_vec();
    if status.split(' ').nth(1) != Some("200") {
        anyhow::bail!(
            "{addr}{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// The snapshot as text tables.
pub fn table(s: &Snapshot) -> String {
    let mut o = String::new();
    let t = &s.throughput;
    o.push_str(&format!(
        "minibatchd {}, up {}\nthroughput: {}/s, {} minibatches/s (over {:.1} s); {} and {} minibatches sent; {} streams open, {} processes attached\n",
        s.version,
        age(s.uptime_s),
        bytes(t.bytes_per_s),
        rate(t.minibatches_per_s),
        t.window_s,
        bytes(t.bytes_total as f64),
        t.minibatches_total,
        t.active_streams,
        t.attached,
    ));
    for d in &s.datasets {
        o.push_str(&format!(
            "\ndataset {}: {} ({}), {}, {}, tiers {}, fingerprint {}\n",
            d.name,
            d.source,
            d.format,
            bytes(d.memory_bytes as f64),
            if d.pinned { "pinned" } else { "not pinned" },
            d.tiers.join("+"),
            d.fingerprint.as_deref().unwrap_or("(computing)"),
        ));
        let rows: Vec<Vec<String>> = d
            .sets
            .iter()
            .map(|set| {
                vec![
                    set.name.clone(),
                    set.examples.to_string(),
                    format!("{} {:?}", set.x.dtype, set.x.shape),
                    format!("{} {:?}", set.y.dtype, set.y.shape),
                ]
            })
            .collect();
        o.push_str(&columns(&["set", "examples", "x", "y"], &rows, "  "));
    }
    o.push_str(&format!("\nstreams ({} open", s.streams.len()));
    if s.streams_unlisted > 0 {
        o.push_str(&format!(", {} more not listed", s.streams_unlisted));
    }
    o.push_str("):\n");
    if s.streams.is_empty() {
        o.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = s.streams.iter().map(|t| stream_cells(t).to_vec()).collect();
        o.push_str(&columns(
            &[
                "id", "method", "dataset", "set", "order", "rank", "position", "mb/s", "bytes",
                "peer", "trainer", "age",
            ],
            &rows,
            "  ",
        ));
    }
    o
}

/// Left-aligned columns under `head`.
fn columns(head: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = indent.to_string();
        for (i, c) in cells.iter().enumerate() {
            l.push_str(&format!("{c:<width$}  ", width = w[i]));
        }
        l.trim_end().to_string() + "\n"
    };
    let mut o = line(head.to_vec());
    for r in rows {
        o.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    o
}

/// Runs the command: one table (or the JSON), or a redrawn one with
/// `--watch`. `say` writes a block of output.
pub async fn run(a: &StatusArgs, say: impl Fn(&str)) -> anyhow::Result<()> {
    let token = a.token()?;
    let interval = a.interval()?;
    loop {
        let body = http_get(&a.metrics_addr, "/status.json", token.as_deref()).await?;
        if a.json {
            say(String::from_utf8_lossy(&body).trim_end());
            return Ok(());
        }
        let snap: Snapshot = serde_json::from_slice(&body)
            .with_context(|| format!("{}/status.json is not a status snapshot", a.metrics_addr))?;
        let Some(every) = interval else {
            say(table(&snap).trim_end());
            return Ok(());
        };
        // Clear the screen, then the table: one redraw per interval.
        say(&format!("\x1b[H\x1b[2J{}", table(&snap).trim_end()));
        tokio::time::sleep(every).await;
    }
}
