//! The listening side: binding with a backlog, the Unix socket's file
//! (stale ones replaced, its mode and group, removal at exit), fitting the
//! file-descriptor limit, and the accept loop (one, for TCP and the Unix
//! socket alike) that backs off on errors that repeat and logs repeated
//! events once per interval.
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};

use crate::metrics::Metrics;

use super::conn::{Accepted, ConnSlot, Slots};
use super::{serving_threads, IoThread, ServerOptions, UdsOptions, FDS_PER_IO_THREAD, FD_RESERVE};

/// First pause after an accept error that will repeat (out of file
/// descriptors, out of memory): the failed connection stays queued, so
/// accepting again at once fails again at once. Retrying with no pause took
/// 77 % of a core and wrote 688,000 log lines in 5 s under a 48-descriptor
/// limit (before this back-off); 10 ms keeps recovery quick once
/// descriptors free up.
pub(super) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept retries: a queued client waits at most this
/// long after descriptors free up.
pub(super) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One log line per this interval per kind of repeated connection event
/// (accept errors, refused connections, handshake timeouts); the next line
/// says how many were suppressed. Refusing connections wrote 30,000 WARN
/// lines in 4.2 s before.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Binds a listening socket on `addr` (the first of its addresses that
/// binds) with a listen backlog of `backlog` (see
/// [`super::DEFAULT_LISTEN_BACKLOG`]); SO_REUSEADDR as tokio's own `bind` sets it.
/// The kernel silently caps the backlog at `net.core.somaxconn`: this warns
/// when it will.
pub async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    if let Some(max) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if backlog > max {
            tracing::warn!(
                backlog,
                somaxconn = max,
                "the kernel caps the listen backlog at net.core.somaxconn; raise it (sysctl) for the backlog asked for"
            );
        }
    }
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// File descriptors a server with `opts` needs when full, with
/// `metrics_connections` metrics connections open too (0 when metrics are
/// off): what [`fit_fd_limit`] makes room for.
pub fn fds_needed(opts: &ServerOptions, metrics_connections: usize) -> u64 {
    // Attachments come on the Unix socket only.
    let attached = if opts.uds.is_some() {
        opts.max_attached
    } else {
        0
    };
    (opts.max_connections + metrics_connections + attached) as u64
        + FD_RESERVE
        + FDS_PER_IO_THREAD * serving_threads(opts.io_threads) as u64
}

/// What [`fit_fd_limit`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimit {
    /// The soft limit already allows `needed` descriptors.
    Enough { soft: u64 },
    /// The soft limit was raised (up to at most the hard limit).
    Raised { from: u64, to: u64 },
    /// The hard limit is below what is needed; the soft limit is now the
    /// hard one. Connections beyond it fail at accept (which backs off).
    Short { limit: u64, needed: u64 },
}

/// Makes room for `needed` open file descriptors (see [`fds_needed`]): raises the soft RLIMIT_NOFILE when it is lower and the
/// hard limit allows, as Go's runtime does at start-up (the common default
/// soft limit of 1024 is below `--max-connections 1024` plus the daemon's
/// own descriptors).
pub fn fit_fd_limit(needed: u64) -> std::io::Result<FdLimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let plan = fd_plan(r.rlim_cur, r.rlim_max, needed);
    let to = match plan {
        FdLimit::Enough { .. } => return Ok(plan),
        FdLimit::Raised { to, .. } => to,
        FdLimit::Short { limit, .. } => limit,
    };
    r.rlim_cur = to;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(plan)
}

/// [`fit_fd_limit`], with what it did or could not do in the log (for
/// start-up).
pub fn make_room_for_fds(needed: u64) {
    match fit_fd_limit(needed) {
        Ok(FdLimit::Enough { .. }) => {}
        Ok(FdLimit::Raised { from, to }) => tracing::info!(
            from,
            to,
            "raised the open-file limit (RLIMIT_NOFILE) to fit --max-connections"
        ),
        Ok(FdLimit::Short { limit, needed }) => tracing::warn!(
            limit,
            needed,
            "the open-file limit (RLIMIT_NOFILE, hard) is below what --max-connections needs: connections beyond it wait in the listen backlog; raise the limit (ulimit -n, LimitNOFILE=) or lower --max-connections"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// The decision of [`fit_fd_limit`], without the system calls.
pub(super) fn fd_plan(soft: u64, hard: u64, needed: u64) -> FdLimit {
    if soft >= needed {
        FdLimit::Enough { soft }
    } else if hard >= needed {
        FdLimit::Raised {
            from: soft,
            to: needed,
        }
    } else {
        FdLimit::Short {
            limit: hard,
            needed,
        }
    }
}

/// At most one log line per `every` for one kind of repeated event, so a
/// flood of failures costs a line per interval rather than one each; the
/// line that is written says how many were suppressed since the last one.
///
/// ```
/// use std::time::Duration;
/// let t = minibatchd::server::LogThrottle::new(Duration::from_secs(5));
/// if let Some(suppressed) = t.allow() {
///     eprintln!("accept failed (and {suppressed} more since the last line)");
/// }
/// ```
#[derive(Debug)]
pub struct LogThrottle {
    pub(super) every: Duration,
    pub(super) state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
pub(super) struct ThrottleState {
    pub(super) last: Option<Instant>,
    pub(super) suppressed: u64,
}

impl LogThrottle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(ThrottleState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(events suppressed since the last line)` when a line may be
    /// written now; `None` (and one more suppressed) otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`Self::allow`] at a given time (for tests).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// Accept errors, told apart by what to do next: an error about one
/// connection (it was reset while queued) is skipped; any other (out of
/// file descriptors or memory) leaves the connection queued and would fail
/// again at once, so the loop pauses, doubling the pause while it lasts.
pub(crate) struct AcceptErrors {
    pub(super) backoff: Duration,
    pub(super) log: LogThrottle,
    /// What the listener is for, in log lines.
    pub(super) what: &'static str,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            backoff: ACCEPT_BACKOFF_MIN,
            log: LogThrottle::new(LOG_EVERY),
            what,
        }
    }

    /// After a successful accept.
    pub(crate) fn ok(&mut self) {
        self.backoff = ACCEPT_BACKOFF_MIN;
    }

    /// Logs (throttled) and, unless the error concerns only one
    /// connection, sleeps before the next accept.
    pub(crate) async fn failed(&mut self, e: &std::io::Error) {
        let one_connection = matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
        );
        let pause = (!one_connection).then_some(self.backoff);
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                error = %e,
                listener = self.what,
                retry_in_ms = pause.map_or(0, |p| p.as_millis() as u64),
                suppressed,
                "accept failed"
            );
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
            self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        }
    }
}

/// A listening socket the accept loop takes connections from: TCP or the
/// Unix socket (see [`UdsOptions`]).
pub(super) trait Listen {
    /// The next connection, with its peer for log lines.
    fn next(&self) -> impl Future<Output = std::io::Result<(Incoming, Peer)>> + Send;
}

/// Who connected, for log lines.
pub(super) enum Peer {
    Tcp(std::net::SocketAddr),
    /// Peers of a listening Unix socket are unnamed.
    Unix,
    /// A TCP peer gone before it could be asked.
    Unknown,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix socket"),
            Peer::Unknown => f.write_str("unknown"),
        }
    }
}

/// An accepted connection still registered with the accepting runtime.
pub(super) enum Incoming {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Incoming {
    /// Deregistered, to be registered again on a serving thread.
    fn into_std(self) -> std::io::Result<Accepted> {
        Ok(match self {
            Incoming::Tcp(s) => Accepted::Tcp(s.into_std()?),
            Incoming::Unix(s) => Accepted::Unix(s.into_std()?),
        })
    }
}

impl Listen for TcpListener {
    async fn next(&self) -> std::io::Result<(Incoming, Peer)> {
        let (stream, peer) = self.accept().await?;
        // Without nodelay small minibatches stall 40 ms on delayed ACKs.
        let _ = stream.set_nodelay(true);
        Ok((Incoming::Tcp(stream), Peer::Tcp(peer)))
    }
}

impl Listen for UnixListener {
    async fn next(&self) -> std::io::Result<(Incoming, Peer)> {
        let (stream, _) = self.accept().await?;
        Ok((Incoming::Unix(stream), Peer::Unix))
    }
}

/// Accepts connections on `listener` (`what` names it in log lines) and
/// hands each, with a slot (see [`Slots`]), to the serving thread with the
/// fewest; refused connections are closed at once (the client sees
/// UNAVAILABLE and can try a replica). The TCP listener and the Unix
/// socket each run one, over the same slots and serving threads. Runs
/// until dropped.
pub(super) async fn accept(
    listener: impl Listen,
    what: &'static str,
    slots: Arc<Slots>,
    io_threads: &[IoThread],
    metrics: &Metrics,
) {
    let mut errors = AcceptErrors::new(what);
    let refused_log = LogThrottle::new(LOG_EVERY);
    loop {
        let (stream, peer) = match listener.next().await {
            Ok(c) => {
                errors.ok();
                c
            }
            Err(e) => {
                metrics.conns.accept_errors.fetch_add(1, Ordering::Relaxed);
                errors.failed(&e).await;
                continue;
            }
        };
        metrics.conns.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = slots.take() else {
            metrics.conns.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = refused_log.allow() {
                tracing::warn!(%peer, listener = what, max = slots.max, suppressed, "connection refused: --max-connections reached, all of them past their handshake");
            }
            continue;
        };
        let Some(io_thread) = io_threads
            .iter()
            .min_by_key(|s| s.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let slot = ConnSlot::new(slot, io_thread.open.clone());
        match stream.into_std() {
            Ok(std) => {
                // Fails only once the thread is gone (shutting down).
                let _ = io_thread.conns.send((std, slot));
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand over an accepted connection"),
        }
    }
}

/// The Unix socket's file, removed when dropped (when [`super::run`]
/// returns, on every path after binding) unless another file has taken
/// its place since.
#[derive(Debug)]
pub struct UdsFile {
    path: PathBuf,
    /// Device and inode of the socket bound, to remove only that one.
    id: (u64, u64),
}

impl Drop for UdsFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the unix socket file");
                }
            }
            _ => {}
        }
    }
}

/// Binds the Unix socket `o.path` with a listen backlog of `backlog`:
/// a socket file left there by a daemon that is gone (connecting is
/// refused) is replaced; a live one (another daemon answers) is an error,
/// and so is any other kind of file, which is never deleted. The file gets
/// mode `o.mode` and group `o.group` before the socket listens, so no
/// client connects through looser permissions.
pub fn bind_uds(o: &UdsOptions, backlog: u32) -> anyhow::Result<(UnixListener, UdsFile)> {
    let path = &o.path;
    let gid = o.group.as_deref().map(group_id).transpose()?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => anyhow::bail!(
                    "{}: another process is serving on this unix socket (is another minibatchd running?)",
                    path.display()
                ),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("{}: cannot remove the stale unix socket", path.display())
                    })?;
                    tracing::info!(path = %path.display(), "removed a stale unix socket file (nothing was listening on it)");
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{}: cannot tell whether this unix socket is in use", path.display())
                    })
                }
            }
        }
        Ok(_) => anyhow::bail!(
            "{}: exists and is not a socket; not replacing it (remove it or choose another --uds path)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    }
    let socket = tokio::net::UnixSocket::new_stream()?;
    socket
        .bind(path)
        .with_context(|| format!("cannot bind the unix socket {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = UdsFile {
        path: path.clone(),
        id: (meta.dev(), meta.ino()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(o.mode))
        .with_context(|| format!("cannot set mode {:04o} on {}", o.mode, path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give {} to group {}",
                path.display(),
                o.group.as_deref().unwrap_or_default()
            )
        })?;
    }
    let listener = socket.listen(backlog)?;
    Ok((listener, file))
}

/// The id of group `name` (a name, or a number).
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("the group name holds a NUL byte")?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: all-zero is a valid `group` (null pointers, zero id).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `buf` for its length.
        let r = unsafe {
            libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out)
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r == 0 && !out.is_null() {
            return Ok(grp.gr_gid);
        }
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(gid);
        }
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r))
                .with_context(|| format!("cannot look up group {name}"));
        }
        anyhow::bail!("unknown group {name} (--uds-group)");
    }
}
