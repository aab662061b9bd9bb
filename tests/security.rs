//! Access control, limits and hostile network input against a real server.
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{code, sample, TestPki, TestServer};
use minibatchd::client::{BatchRequest, Client, ClientOptions};
use minibatchd::server::ServerOptions;
use tonic::Code;

#[tokio::test]
async fn bearer_token_guards_the_service_but_not_health() {
    let opts = ServerOptions {
        auth_token: Some("s3cret".into()),
        ..Default::default()
    };
    let srv = TestServer::start_with(sample(), opts).await;
    let addr = srv.addr.to_string();
    let mut anon = srv.client().await;
    assert_eq!(code(anon.info().await.unwrap_err()), Code::Unauthenticated);
    assert_eq!(
        code(
            anon.get_batch(&BatchRequest::new("train", 0, 10))
                .await
                .unwrap_err()
        ),
        Code::Unauthenticated
    );
    assert!(anon.health().await.unwrap(), "health stays open for probes");
    let bad = ClientOptions {
        token: Some("s3cre".into()),
        ..Default::default()
    };
    let mut c = Client::connect_with(&addr, &bad).await.unwrap();
    assert_eq!(code(c.info().await.unwrap_err()), Code::Unauthenticated);
    let good = ClientOptions {
        token: Some("s3cret".into()),
        ..Default::default()
    };
    let mut c = Client::connect_with(&addr, &good).await.unwrap();
    assert_eq!(
        c.get_batch(&BatchRequest::new("train", 0, 10))
            .await
            .unwrap()
            .x
            .shape,
        vec![10, 784]
    );
}

#[tokio::test]
async fn mutual_tls() {
    let pki = TestPki::new();
    let tls = minibatchd::access::TlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    };
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await;
    let addr = format!("localhost:{}", srv.addr.port());
    let full = ClientOptions {
        tls_ca: Some(pki.path("ca.pem")),
        tls_identity: Some((pki.path("client.pem"), pki.path("client.key"))),
        ..Default::default()
    };
    let mut c = Client::connect_with(&addr, &full).await.unwrap();
    assert_eq!(
        c.get_batch(&BatchRequest::new("valid", 1, 100))
            .await
            .unwrap()
            .x
            .shape,
        vec![100, 784]
    );
    assert!(c.health().await.unwrap());
    // No client certificate: the handshake (or the first call) fails.
    let no_id = ClientOptions {
        tls_ca: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let r = match Client::connect_with(&addr, &no_id).await {
        Ok(mut c) => c.info().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "a client without a certificate is refused");
    // Plaintext against a TLS port fails too.
    let r = match Client::connect(&addr).await {
        Ok(mut c) => c.info().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err());
}

#[tokio::test]
async fn connection_limit_refuses_extra_connections() {
    let srv = TestServer::start_with(
        sample(),
        ServerOptions {
            max_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let mut a = srv.client().await;
    let mut b = srv.client().await;
    a.info().await.unwrap();
    b.info().await.unwrap();
    let third = match Client::connect(&srv.addr.to_string()).await {
        Ok(mut c) => c.info().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(third.is_err(), "a third connection is refused");
    drop(a);
    // The slot frees when the connection closes.
    let mut ok = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(mut c) = Client::connect(&srv.addr.to_string()).await {
            if c.info().await.is_ok() {
                ok = true;
                break;
            }
        }
    }
    assert!(ok, "a new connection is served once one closes");
    b.info().await.unwrap();
}

#[tokio::test]
async fn hostile_bytes_and_absurd_requests_leave_the_server_serving() {
    let srv = TestServer::start(sample()).await;
    let addr = srv.addr;
    tokio::task::spawn_blocking(move || {
        // Random bytes, an HTTP/1 request, and a bogus HTTP/2 preface.
        let mut r = 0x1234_5678_9abc_def0u64;
        for payload in [
            (0..4096)
                .map(|_| {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    r as u8
                })
                .collect::<Vec<u8>>(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\xff\xff\xff\x04\x00\x00\x00\x00".to_vec(),
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(&payload);
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
    })
    .await
    .unwrap();
    let mut c = srv.client().await;
    let long_name = "\u{0}".repeat(10_000);
    for (set, index, size, want) in [
        ("train", u64::MAX, 1u32, Code::OutOfRange),
        ("train", 0, u32::MAX, Code::InvalidArgument),
        (long_name.as_str(), 0, 1, Code::NotFound),
    ] {
        let e = c
            .get_batch(&BatchRequest::new(set, index, size))
            .await
            .unwrap_err();
        assert_eq!(
            code(e),
            want,
            "name of {} bytes, index {index}, size {size}",
            set.len()
        );
    }
    // A request over the 4 MiB message limit.
    let huge = "x".repeat(5 << 20);
    assert_eq!(
        code(
            c.get_batch(&BatchRequest::new(&huge, 0, 1))
                .await
                .unwrap_err()
        ),
        Code::OutOfRange
    );
    let mut r = BatchRequest::new("train", 0, 10);
    r.order.world_size = u32::MAX;
    r.order.rank = u32::MAX - 1;
    assert_eq!(
        code(c.get_batch(&r).await.unwrap_err()),
        Code::InvalidArgument
    );
    r.order = Default::default();
    r.order.shuffle = true;
    r.order.seed = u64::MAX;
    r.order.epoch = u64::MAX;
    assert_eq!(c.get_batch(&r).await.unwrap().x.shape, vec![10, 784]);
    r.count = u64::MAX;
    r.index = 299;
    let n = {
        use tokio_stream::StreamExt;
        let v: Vec<_> = c.stream_batches(&r).await.unwrap().collect().await;
        v.len()
    };
    assert_eq!(n, 1, "count past the end stops at the end");
    assert!(c.health().await.unwrap());
}

#[tokio::test]
async fn a_vanishing_client_frees_its_stream() {
    let srv = TestServer::start(common::synthetic()).await;
    let mut c = srv.client().await;
    let mut r = BatchRequest::new("train", 0, 1000);
    r.order.shuffle = true;
    let mut s = c.stream_batches(&r).await.unwrap();
    use tokio_stream::StreamExt;
    s.next().await.unwrap().unwrap();
    let active = || {
        srv.metrics
            .active_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(active(), 1);
    drop(s);
    drop(c);
    for _ in 0..500 {
        if active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active(), 0, "the stream is dropped when its client leaves");
    assert!(srv
        .metrics
        .render()
        .contains("minibatchd_requests_total{method=\"StreamBatches\",code=\"Cancelled\"} 1"));
}
