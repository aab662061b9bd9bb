//! The Unix domain socket (`--uds`): the same services as TCP with the same
//! token and limits, the socket file's mode, group and lifetime (a stale
//! file replaced, a live one or any other file refused, the file removed at
//! exit), against a real server on real sockets with raw HTTP/2 clients.
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use common::{eventually, grpc, synthetic, Daemon, TestServer, START_UP_TIMEOUT};
use minibatchd::proto;
use minibatchd::server::{ServerOptions, UdsOptions};
use prost::Message;

const TOKEN: &str = "uds-test-token";
/// Bound on every wait for the server.
const WAIT: Duration = Duration::from_secs(20);

/// Server options that also serve on `path`.
fn with_uds(path: &Path) -> ServerOptions {
    ServerOptions {
        uds: Some(UdsOptions::new(path)),
        io_threads: 2,
        ..Default::default()
    }
}

/// A Unix stream to `path` once the server listens there (it binds when
/// its task first runs).
async fn connect_unix(path: &Path) -> tokio::net::UnixStream {
    let t0 = Instant::now();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return s,
            Err(e) => assert!(
                t0.elapsed() < START_UP_TIMEOUT,
                "cannot connect to {}: {e}",
                path.display()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/2 connection over the Unix socket at `path`.
async fn h2_unix(path: &Path) -> h2::client::SendRequest<Bytes> {
    let (client, conn) = h2::client::handshake(connect_unix(path).await)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Calls `method` (a full path, "/pkg.Service/Method") with `req` over
/// `conn`: the response messages and the grpc-status.
async fn call(
    conn: &h2::client::SendRequest<Bytes>,
    method: &str,
    req: &impl Message,
    token: Option<&str>,
) -> (Vec<Bytes>, String) {
    let work = async {
        let mut conn = conn.clone().ready().await.unwrap();
        let mut r = http::Request::post(format!("http://localhost{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        let (resp, mut send) = conn.send_request(r.body(()).unwrap(), false).unwrap();
        send.send_data(grpc(req), true).unwrap();
        let resp = resp.await.unwrap();
        let head_status = resp.headers().get("grpc-status").cloned();
        let mut body = resp.into_body();
        let mut bytes = BytesMut::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            bytes.extend_from_slice(&d);
        }
        let trailers = body.trailers().await.unwrap();
        let status = head_status
            .or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let mut bytes = bytes.freeze();
        let mut messages = Vec::new();
        while bytes.has_remaining() {
            assert_eq!(bytes.get_u8(), 0, "uncompressed messages");
            let n = bytes.get_u32() as usize;
            messages.push(bytes.split_to(n));
        }
        (messages, status)
    };
    tokio::time::timeout(WAIT, work)
        .await
        .expect("the server answers")
}

/// The server-wide health status over `conn`.
async fn health(conn: &h2::client::SendRequest<Bytes>) -> i32 {
    let req = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let (m, status) = call(conn, "/grpc.health.v1.Health/Check", &req, None).await;
    assert_eq!(status, "0");
    tonic_health::pb::HealthCheckResponse::decode(m[0].clone())
        .unwrap()
        .status
}

/// Waits for the server to end; its result.
async fn stopped(srv: &mut TestServer) -> anyhow::Result<()> {
    let h = srv.handle.take().unwrap();
    tokio::time::timeout(WAIT, h)
        .await
        .expect("the server ends")
        .unwrap()
}

/// The error `opts` make the server end with at start-up.
async fn start_up_error(opts: ServerOptions) -> String {
    let mut srv = TestServer::start_with(synthetic(), opts).await;
    format!("{:#}", stopped(&mut srv).await.unwrap_err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_the_same_services_behind_the_same_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let opts = ServerOptions {
        auth_token: Some(TOKEN.into()),
        ..with_uds(&path)
    };
    let srv = TestServer::start_with(synthetic(), opts).await;
    let conn = h2_unix(&path).await;

    assert_eq!(health(&conn).await, 1, "SERVING, with no token");

    let info = "/minibatch.v1.BatchService/GetInfo";
    let (_, status) = call(&conn, info, &proto::GetInfoRequest::default(), None).await;
    assert_eq!(status, "16", "UNAUTHENTICATED without the token");
    let (_, status) = call(
        &conn,
        info,
        &proto::GetInfoRequest::default(),
        Some("wrong"),
    )
    .await;
    assert_eq!(status, "16", "UNAUTHENTICATED with a wrong token");
    let (m, status) = call(&conn, info, &proto::GetInfoRequest::default(), Some(TOKEN)).await;
    assert_eq!(status, "0");
    let info = proto::DatasetInfo::decode(m[0].clone()).unwrap();
    let valid = info.sets.iter().find(|s| s.name == "valid").unwrap();
    assert_eq!(valid.examples, 1_000);

    let req = proto::GetBatchRequest {
        set: "valid".into(),
        index: 1,
        size: 300,
        x_dtype: proto::Dtype::Float32 as i32,
        y_dtype: proto::Dtype::Int64 as i32,
        max_chunk_bytes: 4096,
        ..Default::default()
    };
    let get = "/minibatch.v1.BatchService/GetBatch";
    let (_, status) = call(&conn, get, &req, None).await;
    assert_eq!(status, "16");
    let (m, status) = call(&conn, get, &req, Some(TOKEN)).await;
    assert_eq!(status, "0");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for chunk in m {
        let c = proto::TensorChunk::decode(chunk).unwrap();
        let into = if c.name == "x" { &mut x } else { &mut y };
        assert_eq!(c.offset as usize, into.len(), "{} in order", c.name);
        into.extend_from_slice(&c.data);
    }
    let set = srv.dataset.sets.iter().find(|s| s.name == "valid").unwrap();
    let (rx, ry) = (16 * 4, 8);
    assert_eq!(x, set.x.data[300 * rx..600 * rx], "x over the unix socket");
    assert_eq!(y, set.y.data[300 * ry..600 * ry], "y over the unix socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_file_has_its_mode_and_is_removed_when_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let mut srv = TestServer::start_with(synthetic(), with_uds(&path)).await;
    let conn = h2_unix(&path).await;
    assert_eq!(health(&conn).await, 1);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    drop(conn);
    srv.begin_shutdown();
    stopped(&mut srv).await.unwrap();
    assert!(!path.exists(), "the socket file is removed at exit");

    // Another mode, and the daemon's own group named by number.
    let gid = unsafe { libc::getegid() };
    let opts = ServerOptions {
        uds: Some(UdsOptions {
            path: path.clone(),
            mode: 0o600,
            group: Some(gid.to_string()),
        }),
        ..Default::default()
    };
    let mut srv = TestServer::start_with(synthetic(), opts).await;
    drop(connect_unix(&path).await);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.gid(), gid);
    // Aborted rather than shut down: the file goes all the same.
    srv.handle.as_ref().unwrap().abort();
    let h = srv.handle.take().unwrap();
    let _ = tokio::time::timeout(WAIT, h)
        .await
        .expect("the server ends");
    assert!(
        !path.exists(),
        "the socket file is removed when aborted too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_are_replaced_live_ones_and_other_files_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");

    // Stale: bound, then closed, the file left behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut srv = TestServer::start_with(synthetic(), with_uds(&path)).await;
    let conn = h2_unix(&path).await;
    assert_eq!(health(&conn).await, 1, "served on the replaced socket");
    drop(conn);
    srv.begin_shutdown();
    stopped(&mut srv).await.unwrap();
    assert!(!path.exists());

    // Live: another process still listens there.
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = start_up_error(with_uds(&path)).await;
    assert!(e.contains("another process is serving"), "{e}");
    assert!(
        e.contains(&path.display().to_string()),
        "names the path: {e}"
    );
    assert!(path.exists(), "the live socket is left alone");
    drop(live);
    std::fs::remove_file(&path).unwrap();

    // Not a socket: refused, and left intact.
    std::fs::write(&path, b"precious").unwrap();
    let e = start_up_error(with_uds(&path)).await;
    assert!(e.contains("is not a socket"), "{e}");
    assert!(
        e.contains(&path.display().to_string()),
        "names the path: {e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // An unknown group: refused before anything is bound.
    let opts = ServerOptions {
        uds: Some(UdsOptions {
            group: Some("no-such-group-minibatchd".into()),
            ..UdsOptions::new(&path)
        }),
        ..Default::default()
    };
    let e = start_up_error(opts).await;
    assert!(e.contains("unknown group no-such-group-minibatchd"), "{e}");
    assert!(!path.exists());

    // A mode that is no mode.
    let opts = ServerOptions {
        uds: Some(UdsOptions {
            mode: 0o1777,
            ..UdsOptions::new(&path)
        }),
        ..Default::default()
    };
    let e = start_up_error(opts).await;
    assert!(e.contains("not a permission mode"), "{e}");
}

/// Opens `n` connections to the Unix socket that send nothing.
async fn idle_unix(path: &Path, n: usize) -> Vec<tokio::net::UnixStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect_unix(path).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unix_sockets_share_the_slots_and_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    // A handshake deadline far beyond the test: only eviction can let the
    // real clients in.
    let opts = ServerOptions {
        max_connections: 4,
        handshake_timeout: Duration::from_secs(600),
        ..with_uds(&path)
    };
    let srv = TestServer::start_with(synthetic(), opts).await;
    let _idle = idle_unix(&path, 4).await;
    assert!(
        eventually(WAIT, || srv
            .metrics
            .conns
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4)
        .await,
        "the idle unix sockets hold every slot"
    );
    // A real client over TCP, then one over the socket, get in.
    let mut c = tokio::time::timeout(WAIT, srv.client()).await.unwrap();
    assert!(tokio::time::timeout(WAIT, c.health())
        .await
        .unwrap()
        .unwrap());
    let conn = h2_unix(&path).await;
    assert_eq!(health(&conn).await, 1);
    assert!(
        srv.metrics
            .conns
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    // The handshake deadline closes idle unix sockets.
    let path2 = dir.path().join("m2.sock");
    let opts = ServerOptions {
        handshake_timeout: Duration::from_secs(1),
        ..with_uds(&path2)
    };
    let srv2 = TestServer::start_with(synthetic(), opts).await;
    let mut idle = connect_unix(&path2).await;
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut idle, &mut b))
        .await
        .expect("closed by the handshake deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered: {n:?}");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // Counted just after the socket closes, on the server's thread.
    let timeouts = || {
        srv2.metrics
            .conns
            .handshake_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(eventually(WAIT, || timeouts() == 1).await, "{}", timeouts());
}

/// The binary with `--uds`: it logs the socket, serves health over it, and
/// SIGTERM removes the file.
#[test]
fn the_daemon_serves_on_the_unix_socket_and_removes_it_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("d.sock");
    let mut d = Daemon::start_with(&[], |c| {
        c.env("MINIBATCHD_UDS", &path)
            .env("MINIBATCHD_UDS_MODE", "0640");
    });
    d.wait_for_log(
        &[&format!(
            "serving gRPC on unix socket {} (mode 0640)",
            path.display()
        )],
        WAIT,
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = h2_unix(&path).await;
        assert_eq!(health(&conn).await, 1);
    });
    // Closes the connection (its task lives on `rt`), or the graceful close
    // would wait out the shutdown grace for it.
    drop(rt);
    assert!(d.sigterm().success());
    assert!(!path.exists(), "SIGTERM removes the socket file");
}
