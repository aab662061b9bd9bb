//! Load and soak: many concurrent clients mixing GetBatch and StreamBatches
//! against one server, every minibatch checked (CRC-32C by the client,
//! bytes against the loaded arrays here). Bounded in time and count;
//! `SOAK_SECS=600 cargo test --release --test soak -- --nocapture` is the long
//! version (scripts/soak.sh).
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{indices, rng, synthetic, TestServer};
use minibatchd::client::BatchRequest;
use minibatchd::store::Dataset;
use tokio_stream::StreamExt;

fn rss_bytes() -> u64 {
    common::vm_rss(std::process::id())
}

fn check(ds: &Dataset, set: &str, b: &minibatchd::client::Batch) {
    let s = ds.set(set).unwrap();
    let idx = indices(b);
    let want_x: Vec<u8> = idx.iter().flat_map(|&i| s.x.row(i).to_vec()).collect();
    let want_y: Vec<u8> = idx.iter().flat_map(|&i| s.y.row(i).to_vec()).collect();
    assert!(b.x.data == want_x, "wrong x bytes in minibatch {}", b.index);
    assert!(b.y.data == want_y, "wrong y bytes in minibatch {}", b.index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_exact_bytes_with_bounded_memory() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let clients = 16;
    let srv = Arc::new(TestServer::start(synthetic()).await);
    let checked = Arc::new(AtomicU64::new(0));
    let rss0 = rss_bytes();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..clients {
        let (srv, checked) = (srv.clone(), checked.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = srv.client().await;
            let mut r = rng(w as u64 + 1);
            let mut rounds = 0u64;
            while Instant::now() < deadline && rounds < 100_000 {
                rounds += 1;
                let set = ["train", "test"][(r() % 2) as usize];
                let size = [1u32, 64, 500, 2000][(r() % 4) as usize];
                let mut req = BatchRequest::new(set, 0, size);
                req.with_indices = true;
                req.order.shuffle = r().is_multiple_of(2);
                req.order.seed = r() % 3;
                req.order.epoch = r() % 5;
                if r().is_multiple_of(3) {
                    req.order.world_size = 4;
                    req.order.rank = (r() % 4) as u32;
                }
                let n = srv.dataset.set(set).unwrap().examples() as u64;
                let shard = if req.order.world_size > 1 { n / 4 } else { n };
                let batches = shard.div_ceil(size as u64);
                if r().is_multiple_of(4) {
                    req.index = r() % batches;
                    req.count = 1 + r() % 5;
                    let mut s = c.stream_batches(&req).await.expect("StreamBatches");
                    while let Some(b) = s.next().await {
                        check(&srv.dataset, set, &b.expect("a minibatch"));
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    req.index = r() % batches;
                    let b = c.get_batch(&req).await.expect("GetBatch");
                    check(&srv.dataset, set, &b);
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let rss1 = rss_bytes();
    let n = checked.load(Ordering::Relaxed);
    let m = srv.metrics.render();
    println!("soak: {clients} clients, {secs} s, {n} minibatches checked, 0 errors; RSS {} MiB -> {} MiB", rss0 >> 20, rss1 >> 20);
    assert!(n >= clients as u64, "only {n} minibatches");
    assert!(!m.contains("code=\"Internal\""), "{m}");
    // Clients and server share this process: the bound covers both. The
    // largest minibatch is 2000 x 784 x 4 = 6.3 MB; 16 clients with one in
    // flight each and their buffers stay far below 256 MiB.
    assert!(
        rss1 < rss0 + (256 << 20),
        "RSS grew from {} to {} MiB",
        rss0 >> 20,
        rss1 >> 20
    );
}
