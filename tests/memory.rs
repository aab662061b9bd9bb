//! Memory a client can make the server hold: chunk size floors, the one
//! memory budget, and request bodies, against a real server with raw
//! HTTP/2 clients that behave as an attacker would (tiny flow-control
//! windows, streams never read, request bodies never finished).
mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{grpc, indices, synthetic, TestServer};
use minibatchd::batch::prepared::{Limits, MIN_CHUNK_BYTES};
use minibatchd::client::BatchRequest;
use minibatchd::proto;
use minibatchd::server::ServerOptions;
use tokio_stream::StreamExt;

/// A raw HTTP/2 connection whose every stream window is `window` bytes.
async fn h2_client(addr: std::net::SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window.max(65_535))
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn post(addr: std::net::SocketAddr, method: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/minibatch.v1.BatchService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Asks on `conn` for a shuffled 10,000-example minibatch of "train"
/// (shuffle seed `seed`) in 4 MiB chunks, and reads none of it.
async fn unread_minibatch(
    conn: &mut h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
    seed: u64,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    *conn = conn.clone().ready().await.unwrap();
    let req = proto::GetBatchRequest {
        set: "train".into(),
        size: 10_000,
        order: Some(proto::Order {
            shuffle: true,
            seed,
            ..Default::default()
        }),
        max_chunk_bytes: 4 << 20,
        ..Default::default()
    };
    let (resp, mut send) = conn.send_request(post(addr, "GetBatch"), false).unwrap();
    send.send_data(grpc(&req), true).unwrap();
    (resp, send)
}

/// The value of an unlabelled metric on the server's page.
fn metric(srv: &TestServer, name: &str) -> u64 {
    let page = srv.metrics.render();
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} is on the metrics page"))
        .parse()
        .unwrap()
}

/// The grpc-status of a trailers-only answer (an error before any message).
async fn status_of(resp: h2::client::ResponseFuture) -> String {
    let r = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("the server answers")
        .unwrap();
    r.headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Finding 1: `max_chunk_bytes = 1` made one TensorChunk per byte, all
/// queued at once (867 MiB for a 1,000-example minibatch). Requests are now
/// floored at MIN_CHUNK_BYTES (rounded down to whole rows), so the message
/// count stays that of 64 KiB chunks.
#[tokio::test]
async fn one_byte_chunks_are_floored() {
    let srv = TestServer::start(synthetic()).await;
    let mut raw = srv.raw_client().await;
    let req = proto::GetBatchRequest {
        set: "train".into(),
        index: 0,
        size: 10_000,
        order: Some(proto::Order {
            shuffle: true,
            seed: 3,
            ..Default::default()
        }),
        max_chunk_bytes: 1,
        ..Default::default()
    };
    let mut s = raw.get_batch(req).await.unwrap().into_inner();
    let (mut messages, mut x_bytes) = (0usize, 0usize);
    let row = 784 * 4;
    let floor = MIN_CHUNK_BYTES / row * row;
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        messages += 1;
        let end = m.offset as usize + m.data.len();
        if end < m.total_bytes as usize {
            assert!(
                m.data.len() >= floor,
                "{} chunk of {} bytes",
                m.name,
                m.data.len()
            );
        }
        if m.name == "x" {
            x_bytes += m.data.len();
        }
    }
    assert_eq!(x_bytes, 10_000 * row);
    // x in floor-sized chunks, y (80 KB) in two.
    assert_eq!(messages, (10_000 * row).div_ceil(floor) + 2);
}

/// Finding 3: 4 connections × 64 streams × one gathered minibatch each,
/// never read, held 5.9 GB. Now every gathered byte is leased from one
/// budget: streams that cannot get it wait, then end RESOURCE_EXHAUSTED;
/// the budget is never exceeded; a well-behaved client keeps getting
/// correct minibatches; all of it returns when the attacker leaves.
#[tokio::test]
async fn streams_never_read_stay_within_the_memory_budget() {
    let budget = 16 << 20;
    let opts = ServerOptions {
        limits: Limits {
            budget_bytes: budget,
            budget_wait: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let srv = TestServer::start_with(synthetic(), opts).await;
    let mut attacker = h2_client(srv.addr, 1).await;
    let mut held_streams = Vec::new();
    for seed in 0..64u64 {
        let (resp, _) = unread_minibatch(&mut attacker, srv.addr, seed).await;
        held_streams.push(resp);
    }
    // Until the streams that got no budget have been refused and ended,
    // sample what the budget holds.
    let mut most = 0;
    for _ in 0..500 {
        most = most.max(metric(&srv, "minibatchd_budget_held_bytes"));
        let refused = metric(&srv, "minibatchd_budget_refusals_total");
        let active = srv
            .metrics
            .active_streams
            .load(std::sync::atomic::Ordering::Relaxed);
        if refused > 0 && active + refused >= 64 && active <= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= budget as u64,
        "held {most} of a {budget}-byte budget"
    );
    assert!(
        metric(&srv, "minibatchd_budget_refusals_total") > 0,
        "some streams were refused"
    );
    let holding = metric(&srv, "minibatchd_budget_held_bytes");
    assert!(holding > 0, "the unread streams hold their chunks");

    // A well-behaved client, meanwhile: contiguous minibatches are slices
    // and need no budget; a shuffled one fits in what is left.
    let mut c = srv.client().await;
    let b = c
        .get_batch(&BatchRequest::new("train", 2, 500))
        .await
        .unwrap();
    assert_eq!(b.x.data, srv.dataset.sets[0].x.rows(1000, 1500));
    let mut r = BatchRequest::new("train", 2, 500);
    r.order.shuffle = true;
    r.with_indices = true;
    let b = c.get_batch(&r).await.unwrap();
    let want: Vec<u8> = indices(&b)
        .into_iter()
        .flat_map(|i| srv.dataset.sets[0].x.row(i).to_vec())
        .collect();
    assert_eq!(&b.x.data[..], &want[..]);

    // The attacker leaves: every byte returns.
    drop(held_streams);
    drop(attacker);
    let mut freed = false;
    for _ in 0..500 {
        if metric(&srv, "minibatchd_budget_held_bytes") == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the budget is whole again once the attacker left");
}

/// A client that never reads can hold the whole budget; a well-behaved
/// client that then waits for budget gets it, because connections whose
/// leases outlive the stall time are closed while someone waits.
#[tokio::test]
async fn stalled_holders_are_evicted_for_a_waiting_client() {
    let budget = 16 << 20;
    let opts = ServerOptions {
        limits: Limits {
            budget_bytes: budget,
            budget_wait: Duration::from_secs(20),
            budget_stall: Duration::from_millis(500),
            ..Default::default()
        },
        ..Default::default()
    };
    let srv = TestServer::start_with(synthetic(), opts).await;
    // Two connections: one connection's chunks hold at most half the budget.
    let mut attackers = [h2_client(srv.addr, 1).await, h2_client(srv.addr, 1).await];
    let mut held_streams = Vec::new();
    for seed in 0..8u64 {
        let attacker = &mut attackers[seed as usize % 2];
        held_streams.push(unread_minibatch(attacker, srv.addr, seed).await);
    }
    // Wait until the attacker holds most of the budget.
    let mut held = 0;
    for _ in 0..500 {
        held = metric(&srv, "minibatchd_budget_held_bytes");
        if held >= 12 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held >= 12 << 20, "the attackers hold {held} bytes");
    // A shuffled 5,000-example minibatch: the Rust client asks for whole
    // messages, 4 MiB chunks, which do not fit beside the attacker.
    let mut c = srv.client().await;
    let mut r = BatchRequest::new("train", 1, 5000);
    r.order.shuffle = true;
    r.with_indices = true;
    let b = c.get_batch(&r).await.expect("served after the eviction");
    let first = indices(&b)[0];
    assert_eq!(&b.x.data[..784 * 4], srv.dataset.sets[0].x.row(first));
    assert!(metric(&srv, "minibatchd_budget_evictions_total") >= 1);
    // The attackers' connections were closed: their streams end with an error.
    for (resp, _) in held_streams {
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            let mut body = resp.await?.into_body();
            while let Some(d) = body.data().await {
                d?;
            }
            body.trailers().await.map(|_| ())
        })
        .await
        .expect("the evicted streams end");
        assert!(r.is_err(), "an evicted stream ends with an error");
    }
}

/// Finding 6: partial request bodies were held until the client left (2
/// connections × 64 streams × 4 MiB − 1 byte: 640 MB). Requests are now
/// capped at 64 KiB and must arrive within the request timeout.
#[tokio::test]
async fn partial_and_oversized_requests_are_refused() {
    let opts = ServerOptions {
        limits: Limits {
            request_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let srv = TestServer::start_with(synthetic(), opts).await;
    let mut h2 = h2_client(srv.addr, 65_535).await;

    // A body that declares 1,000 bytes, sends 10 and stops.
    h2 = h2.ready().await.unwrap();
    let (resp, mut send) = h2.send_request(post(srv.addr, "GetBatch"), false).unwrap();
    let mut partial = BytesMut::new();
    partial.put_u8(0);
    partial.put_u32(1000);
    partial.put_slice(&[0u8; 10]);
    send.send_data(partial.freeze(), false).unwrap();
    assert_eq!(status_of(resp).await, "4", "DEADLINE_EXCEEDED");
    drop(send);

    // A declared length over 64 KiB is refused before anything is read.
    h2 = h2.ready().await.unwrap();
    let (resp, mut send) = h2.send_request(post(srv.addr, "GetBatch"), false).unwrap();
    let mut big = BytesMut::new();
    big.put_u8(0);
    big.put_u32(100 << 10);
    send.send_data(big.freeze(), false).unwrap();
    assert_eq!(status_of(resp).await, "11", "OUT_OF_RANGE");

    // An unknown method of the service.
    h2 = h2.ready().await.unwrap();
    let (resp, mut send) = h2.send_request(post(srv.addr, "Nope"), false).unwrap();
    send.send_data(grpc(&proto::GetInfoRequest::default()), true)
        .unwrap();
    assert_eq!(status_of(resp).await, "12", "UNIMPLEMENTED");

    assert_eq!(metric(&srv, "minibatchd_budget_held_bytes"), 0);
    let mut c = srv.client().await;
    assert_eq!(c.info().await.unwrap().sets.len(), 3);
}
