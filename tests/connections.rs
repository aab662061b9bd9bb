//! Connection-level limits against a real server on real sockets: idle
//! sockets and the handshake deadline.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{sample, TestPki, TestServer};
use minibatchd::client::{Client, ClientOptions};
use minibatchd::server::ServerOptions;

/// The HTTP/2 client preface and an empty SETTINGS frame: what a real
/// client sends first, enough for the server to count it established.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Polls `f` until it holds or `limit` passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
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
