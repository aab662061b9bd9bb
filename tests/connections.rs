//! Connection-level limits against a real server on real sockets: idle
//! sockets and the handshake deadline, running out of file descriptors,
//! log floods, the listen backlog, and the client flags around them.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{eventually, free_port, run, sample, TestPki, TestServer, BIN};
use minibatchd::client::{Client, ClientOptions};
use minibatchd::server::ServerOptions;

/// The HTTP/2 client preface and an empty SETTINGS frame: what a real
/// client sends first, enough for the server to count it established.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A raw connection the server counts as established: it sent the
/// preface, and the server's SETTINGS came back (the server starts HTTP/2,
/// and so writes them, only after the preface arrived).
fn established(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(PREFACE_AND_SETTINGS).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 4, "the server's first frame is SETTINGS");
    s
}

/// Opens `n` TCP connections that send nothing.
fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

/// What a read on `s` sees within `wait`: `Some(true)` the server closed
/// it (EOF or reset), `Some(false)` bytes arrived, `None` nothing yet.
fn closed_within(s: &mut TcpStream, wait: Duration) -> Option<bool> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Some(true),
        Ok(_) => Some(false),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(true),
    }
}

/// Connects and checks health within `limit`, as a probe would.
async fn health_within(addr: &str, o: &ClientOptions, limit: Duration) -> Result<bool, String> {
    tokio::time::timeout(limit, async {
        let mut c = Client::connect_with(addr, o)
            .await
            .map_err(|e| e.to_string())?;
        c.health().await.map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no answer within {limit:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_lock_out_a_real_client() {
    // A handshake deadline far beyond the test: only eviction can let the
    // client in promptly.
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    let mut idle = idle_sockets(srv.addr, 16);
    let open = || srv.metrics.conns.open.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || open() == 16).await,
        "16 idle sockets hold the 16 slots ({} held)",
        open()
    );
    let t0 = Instant::now();
    let r = health_within(
        &srv.addr.to_string(),
        &ClientOptions::default(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(r, Ok(true), "health with every slot held by an idle socket");
    println!("health SERVING in {:?} with 16/16 slots idle", t0.elapsed());
    assert_eq!(srv.metrics.conns.evicted.load(Ordering::Relaxed), 1);
    // The oldest idle socket made room; the newest still holds its slot.
    let oldest =
        tokio::task::block_in_place(|| closed_within(&mut idle[0], Duration::from_secs(5)));
    assert_eq!(oldest, Some(true), "the oldest idle socket is closed");
    let newest =
        tokio::task::block_in_place(|| closed_within(&mut idle[15], Duration::from_millis(200)));
    assert_eq!(newest, None, "the newest idle socket stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sockets_that_never_say_hello_do_not_lock_out_a_real_client() {
    let pki = TestPki::new();
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(600),
            tls: Some(pki.server_files(true)),
            ..Default::default()
        },
    )
    .await;
    let _idle = idle_sockets(srv.addr, 4);
    let open = || srv.metrics.conns.open.load(Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(10), || open() == 4).await);
    let addr = format!("localhost:{}", srv.addr.port());
    let r = health_within(&addr, &pki.client_options(), Duration::from_secs(5)).await;
    assert_eq!(
        r,
        Ok(true),
        "mTLS health with every slot held by a silent socket"
    );
    // mTLS is still enforced by the server's own handshake.
    let no_cert = ClientOptions {
        tls_ca: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let r = health_within(&addr, &no_cert, Duration::from_secs(5)).await;
    assert!(
        r.is_err(),
        "a client without a certificate is refused: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_closed_after_the_handshake_deadline() {
    let deadline = Duration::from_secs(1);
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            handshake_timeout: deadline,
            ..Default::default()
        },
    )
    .await;
    let mut c = srv.client().await;
    assert!(c.health().await.unwrap());
    let accepted = srv.metrics.conns.accepted.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    // Half a preface, then nothing: still not a client.
    let mut half = TcpStream::connect(srv.addr).unwrap();
    half.write_all(&PREFACE_AND_SETTINGS[..16]).unwrap();
    for (name, s) in [("silent", &mut silent), ("half a preface", &mut half)] {
        let r = tokio::task::block_in_place(|| closed_within(s, Duration::from_secs(10)));
        assert_eq!(r, Some(true), "{name}: closed within 10 s");
    }
    let took = t0.elapsed();
    assert!(
        took >= deadline,
        "closed after the deadline, not before: {took:?}"
    );
    println!("idle sockets closed {took:?} after connecting (deadline {deadline:?})");
    // Counted just after the socket closes, on the serving thread.
    let timeouts = || srv.metrics.conns.handshake_timeouts.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || timeouts() == 2).await,
        "{} handshake timeouts counted",
        timeouts()
    );
    // The established connection outlived the deadline: no reconnect.
    assert!(c.health().await.unwrap());
    assert_eq!(
        srv.metrics.conns.accepted.load(Ordering::Relaxed),
        accepted + 2,
        "only the two idle sockets were accepted since"
    );
}

/// The real binary serving the bundled sample, its stderr in its log
/// (level info), under an open-file limit of `nofile` (soft and hard) when
/// given.
struct Daemon(common::Daemon);

impl std::ops::Deref for Daemon {
    type Target = common::Daemon;
    fn deref(&self) -> &common::Daemon {
        &self.0
    }
}

impl Daemon {
    fn start(nofile: Option<u64>, extra: &[&str]) -> Daemon {
        let args = [&["--no-pin", "--io-threads", "2"], extra].concat();
        let d = common::Daemon::start_with(&args, |cmd| {
            // Debug for the service: it says when start-up work is done.
            cmd.env("MINIBATCHD_LOG", "info");
            if let Some(n) = nofile {
                // SAFETY: setrlimit is async-signal-safe; it runs in the child
                // between fork and exec and touches nothing else.
                unsafe {
                    cmd.pre_exec(move || {
                        let r = libc::rlimit {
                            rlim_cur: n as libc::rlim_t,
                            rlim_max: n as libc::rlim_t,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        });
        // Start-up work (dataset statistics, row checksums) goes on in the
        // background after health says SERVING: wait until it is done, so
        // CPU measured later is the daemon's reaction to the test alone.
        d.wait_for_log(
            &["dataset statistics ready", "row CRCs ready"],
            Duration::from_secs(120),
        );
        Daemon(d)
    }

    fn log_lines(&self) -> usize {
        self.log_text().lines().count()
    }

    /// User plus system CPU time so far (`/proc/PID/stat`), in seconds.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

/// Log lines and CPU seconds the daemon spends over `window`.
fn measure(d: &Daemon, window: Duration) -> (usize, f64) {
    let (l0, c0) = (d.log_lines(), d.cpu_secs());
    std::thread::sleep(window);
    (d.log_lines() - l0, d.cpu_secs() - c0)
}

/// Out of file descriptors, the accept loop backs off instead of spinning
/// (it took 77 % of a core and wrote 688,000 lines in 5 s before), and
/// serves again once connections close.
#[test]
fn out_of_file_descriptors_backs_off_quietly_and_recovers() {
    let d = Daemon::start(Some(64), &["--handshake-timeout-secs", "600"]);
    let addr: SocketAddr = d.addr.parse().unwrap();
    // More than 64 descriptors' worth; fewer than the old 128 backlog (so
    // connect() does not stall on a full queue before the fix either).
    let socks = idle_sockets(addr, 100);
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(3);
    let (lines, cpu) = measure(&d, window);
    println!(
        "fd limit 64, 100 idle connections: {lines} log lines and {cpu:.2} s CPU in {window:?}"
    );
    assert!(lines <= 3, "{lines} log lines in {window:?}");
    assert!(
        cpu < 0.3 * window.as_secs_f64(),
        "{cpu:.2} s CPU in {window:?}: spinning"
    );
    assert!(
        d.log_text().contains("Too many open files"),
        "the condition is logged once:\n{}",
        d.log_text()
    );
    drop(socks);
    let t0 = Instant::now();
    while !d.healthy() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "serves again once the connections close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Metrics connections are capped: a pile of them cannot take the
/// descriptors the gRPC listener needs.
#[test]
fn metrics_connections_are_capped_and_do_not_starve_grpc() {
    let maddr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(
        Some(64),
        &["--metrics-addr", &maddr, "--metrics-max-connections", "4"],
    );
    let socks = idle_sockets(maddr.parse().unwrap(), 100);
    std::thread::sleep(Duration::from_millis(500));
    let (lines, cpu) = measure(&d, Duration::from_secs(2));
    println!("fd limit 64, 100 idle metrics connections: {lines} log lines, {cpu:.2} s CPU in 2 s");
    assert!(lines <= 3, "{lines} log lines");
    assert!(
        d.healthy(),
        "gRPC health with 100 metrics connections open:\n{}",
        d.log_text()
    );
    drop(socks);
}

/// Refusing connections at --max-connections logs a line per interval, not
/// one per connection (30,000 lines in 4.2 s before).
#[test]
fn refused_connections_are_logged_once_per_interval() {
    let d = Daemon::start(None, &["--max-connections", "1"]);
    let addr: SocketAddr = d.addr.parse().unwrap();
    let _held = established(addr);
    for _ in 0..300 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = closed_within(&mut s, Duration::from_secs(5));
    }
    let refused = d
        .log_text()
        .lines()
        .filter(|l| l.contains("connection refused"))
        .count();
    println!("300 refused connections: {refused} log lines");
    assert!(
        (1..=2).contains(&refused),
        "{refused} lines:\n{}",
        d.log_text()
    );
}

/// `ss -Hltn` Send-Q of the listener on `port` (for a listening socket,
/// the backlog the kernel uses); `None` when ss is not installed.
fn ss_backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    // State Recv-Q Send-Q Local Peer
    line.split_whitespace().nth(2)?.parse().ok()
}

#[tokio::test]
async fn listen_backlog_reaches_the_socket() {
    if Command::new("ss").arg("-V").output().is_err() {
        eprintln!("ss (iproute2) is not installed: cannot read the backlog back; skipped");
        return;
    }
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let l = minibatchd::server::bind("127.0.0.1:0", 777).await.unwrap();
    let port = l.local_addr().unwrap().port();
    assert_eq!(ss_backlog(port), Some(777.min(somaxconn)));
    // The flag and the default, through the binary.
    let d = tokio::task::spawn_blocking(|| Daemon::start(None, &["--listen-backlog", "333"]))
        .await
        .unwrap();
    let port: u16 = d.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(ss_backlog(port), Some(333.min(somaxconn)));
    let d = tokio::task::spawn_blocking(|| Daemon::start(None, &[]))
        .await
        .unwrap();
    let port: u16 = d.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(
        ss_backlog(port),
        Some(minibatchd::server::DEFAULT_LISTEN_BACKLOG.min(somaxconn))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_without_tls_ca_is_refused() {
    let srv = TestServer::start(sample()).await;
    let _ = srv.client().await;
    let pki = TestPki::new();
    let (addr, cert, key) = (
        srv.addr.to_string(),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["health", "--server", &addr, "--tls-client-cert"])
            .arg(&cert)
            .arg("--tls-client-key")
            .arg(&key)
            .env("MINIBATCHD_LOG", "error")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "health over plaintext with a client certificate succeeded"
    );
    assert!(err.contains("--tls-ca"), "{err}");
}

/// A server that resets the connection makes `health` fail with a message,
/// not die of SIGPIPE (14 of 30 runs were killed by signal 13 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_reset_as_an_error_not_a_signal() {
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await;
    let _ = srv.client().await; // serving (its connection closes again)
    let open = || srv.metrics.conns.open.load(Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(10), || open() == 0).await);
    // The only slot, held by an established connection: every other
    // connection is closed at accept, unread, so the kernel resets it.
    let held = tokio::task::block_in_place(|| established(srv.addr));
    assert_eq!(open(), 1);
    let addr = srv.addr.to_string();
    let outs = tokio::task::spawn_blocking(move || {
        (0..30)
            .map(|_| run(&["health", "--server", &addr]))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for o in &outs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.signal(),
            None,
            "health killed by a signal: {:?} {err}",
            o.status
        );
        assert!(!o.status.success());
        assert!(err.contains("error"), "{err}");
    }
    drop(held);
}

/// Runs the binary with `args`; kills it if still running after `limit`
/// (a server that accepted bad options would serve forever).
fn run_bounded(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(BIN)
        .args(args)
        .env("MINIBATCHD_LOG", "error")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(Path::new(&err)).unwrap_or_default();
    match st {
        None => (None, format!("still running after {limit:?}: {text}")),
        Some(st) => (st.code(), text),
    }
}

#[test]
fn absurd_durations_and_message_sizes_are_refused_at_start_up() {
    for (flag, value, says) in [
        ("--shutdown-grace-secs", "1e30", "allowed"),
        ("--shutdown-grace-secs", "-1", "non-negative"),
        ("--keepalive-secs", "inf", "finite"),
        ("--keepalive-secs", "NaN", "finite"),
        (
            "--handshake-timeout-secs",
            "0",
            "handshake timeout must be longer than zero",
        ),
        ("--max-message-bytes", "4294967296", "4294967295"),
        ("--listen-backlog", "0", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let (code, err) = run_bounded(
            &[
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "off",
                &arg,
            ],
            Duration::from_secs(30),
        );
        assert!(
            matches!(code, Some(1 | 2)),
            "{flag} {value}: exit {code:?}, not a refusal: {err}"
        );
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

/// A client whose runtime is not driven between calls (the Python client's
/// native transport) cannot answer the server's keepalive pings, so the
/// server closes its idle connection; its next call goes out again on a new
/// connection instead of failing with "broken pipe".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_after_the_server_closed_an_idle_connection_succeeds() {
    let opts = ServerOptions {
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let s = TestServer::start_with(sample(), opts).await;
    drop(s.client().await); // serving
    let (addr, metrics) = (s.addr.to_string(), s.metrics.clone());
    let open = move || metrics.conns.open.load(Ordering::Relaxed);
    let r = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut c = rt.block_on(Client::connect(&addr)).unwrap();
        let req = minibatchd::client::BatchRequest::new("train", 0, 10);
        rt.block_on(c.get_batch(&req)).unwrap();
        // The runtime sleeps with the thread: pings go unanswered.
        let t0 = Instant::now();
        while open() > 0 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let closed = open() == 0;
        (closed, rt.block_on(c.get_batch(&req)).map(|b| b.x.shape))
    })
    .await
    .unwrap();
    assert!(r.0, "the server closed the idle connection");
    assert_eq!(r.1.unwrap(), vec![10, 784]);
}
