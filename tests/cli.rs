//! The real binary: inspect, serve, and the client subcommands.
mod common;

use common::{eventually, free_port, run, vm_rss, Daemon, BIN};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn inspect_json_of_the_bundled_sample() {
    let out = run(&["inspect", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sets = v["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 3);
    assert_eq!(sets[0]["name"], "train");
    assert_eq!(sets[0]["examples"], 3000);
    assert_eq!(sets[0]["x"]["shape"], serde_json::json!([3000, 784]));
    assert_eq!(sets[0]["x"]["dtype"], "float32");
    assert_eq!(sets[0]["x"]["multiple_of_1_256"], true);
    assert_eq!(sets[0]["y"]["dtype"], "int64");
    assert_eq!(sets[0]["y"]["histogram"]["7"], 300);
    assert_eq!(sets[0]["x"]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn hostile_file_exits_non_zero_naming_global_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("evil.pkl");
    std::fs::write(
        &p,
        b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    let out = run(&["inspect", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("evil.pkl"), "{err}");
    assert!(err.contains("byte 2"), "{err}");
    assert!(err.contains("refusing global os.system"), "{err}");
    // serve refuses to start on it, too.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "off",
            "--data",
            p.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Writes the bundled sample's arrays as IDX files (the official format:
/// big-endian dimensions, uint8 pixels 0..255, uint8 labels).
fn write_idx(dir: &Path, gz: bool) {
    let ds = minibatchd::load::load_bytes(
        Path::new("s"),
        minibatchd::BUNDLED_SAMPLE,
        &Default::default(),
    )
    .unwrap();
    let train_x: Vec<u8> = [&ds.sets[0].x, &ds.sets[1].x]
        .iter()
        .flat_map(|t| {
            t.data
                .chunks(4)
                .map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 256.0) as u8)
        })
        .collect();
    let train_y: Vec<u8> = [&ds.sets[0].y, &ds.sets[1].y]
        .iter()
        .flat_map(|t| t.data.chunks(8).map(|c| c[0]))
        .collect();
    let test_x: Vec<u8> = ds.sets[2]
        .x
        .data
        .chunks(4)
        .map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 256.0) as u8)
        .collect();
    let test_y: Vec<u8> = ds.sets[2].y.data.chunks(8).map(|c| c[0]).collect();
    let file = |name: &str, dims: &[u32], data: &[u8]| {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        let name = if gz {
            format!("{name}.gz")
        } else {
            name.to_string()
        };
        let bytes = if gz { gzip(&b) } else { b };
        std::fs::File::create(dir.join(name))
            .unwrap()
            .write_all(&bytes)
            .unwrap();
    };
    file("train-images-idx3-ubyte", &[4000, 28, 28], &train_x);
    file("train-labels-idx1-ubyte", &[4000], &train_y);
    file("t10k-images-idx3-ubyte", &[1000, 28, 28], &test_x);
    file("t10k-labels-idx1-ubyte", &[1000], &test_y);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    // SAFETY: libdeflate's documented compressor API on live buffers.
    unsafe {
        let c = libdeflate_sys::libdeflate_alloc_compressor(6);
        let bound = libdeflate_sys::libdeflate_gzip_compress_bound(c, data.len());
        let mut out = vec![0u8; bound];
        let n = libdeflate_sys::libdeflate_gzip_compress(
            c,
            data.as_ptr() as *const _,
            data.len(),
            out.as_mut_ptr() as *mut _,
            bound,
        );
        libdeflate_sys::libdeflate_free_compressor(c);
        out.truncate(n);
        out
    }
}

#[test]
fn idx_directory_reproduces_the_pickle_split() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_idx(dir.path(), gz);
        let out = run(&[
            "inspect",
            "--json",
            "--valid-split",
            "1000",
            dir.path().to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let sample: serde_json::Value =
            serde_json::from_slice(&run(&["inspect", "--json"]).stdout).unwrap();
        assert_eq!(v["format"], "idx");
        for i in 0..3 {
            let (s, p) = (&v["sets"][i], &sample["sets"][i]);
            assert_eq!(s["name"], p["name"]);
            assert_eq!(s["examples"], p["examples"]);
            assert_eq!(s["x"]["dtype"], "uint8");
            assert_eq!(s["x"]["uint8_divisor"], 256);
            assert_eq!(
                s["y"]["sha256"], p["y"]["sha256"],
                "labels widened to int64 match the pickle"
            );
        }
        // Served as float32, IDX pixels are the pickle's values exactly.
        let dir_s = dir.path().to_str().unwrap().to_string();
        let d = Daemon::start(&["--data", &dir_s, "--valid-split", "1000"]);
        let outd = tempfile::tempdir().unwrap();
        let o = run(&[
            "get",
            "--server",
            &d.addr,
            "--set",
            "valid",
            "--index",
            "1",
            "--size",
            "300",
            "--x-dtype",
            "float32",
            "--out",
            outd.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(outd.path().join("x.npy")).unwrap();
        let ds = minibatchd::load::load_bytes(
            Path::new("s"),
            minibatchd::BUNDLED_SAMPLE,
            &Default::default(),
        )
        .unwrap();
        let want = ds.sets[1].x.rows(300, 600);
        assert_eq!(&got[got.len() - want.len()..], &want[..]);
    }
}

#[test]
fn serve_get_info_health_and_sigterm() {
    let mut d = Daemon::start(&[]);
    let o = run(&["info", "--server", &d.addr]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("train") && text.contains("3000 examples"),
        "{text}"
    );
    let outd = tempfile::tempdir().unwrap();
    let o = run(&[
        "get",
        "--server",
        &d.addr,
        "--index",
        "2",
        "--size",
        "500",
        "--out",
        outd.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let x = std::fs::read(outd.path().join("x.npy")).unwrap();
    assert!(x.starts_with(b"\x93NUMPY\x01\x00"));
    assert_eq!(x.len(), 128 + 500 * 784 * 4);
    let ds = minibatchd::load::load_bytes(
        Path::new("s"),
        minibatchd::BUNDLED_SAMPLE,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(&x[128..], &ds.sets[0].x.rows(1000, 1500)[..]);
    let o = run(&["bench", "--server", &d.addr, "--count", "20", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["minibatches"], 20);
    let st = d.sigterm();
    assert!(st.success(), "graceful exit on SIGTERM: {st:?}");
    assert!(
        !run(&["health", "--server", &d.addr]).status.success(),
        "health fails once the daemon is gone"
    );
}

#[test]
fn bad_configuration_is_refused() {
    let o = run(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
        "--chunk-bytes",
        "5000000",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exceeds the max message size"));
}

/// Reads the daemon's `/metrics` page over plain HTTP/1.0.
fn metrics_page(addr: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{page}"))
}

/// Slow readers (10 minibatches/s) and readers that vanish mid-stream cost the
/// daemon bounded memory; when they go, their streams are freed and a second
/// identical round reuses the memory instead of adding to it.
///
/// RSS after the clients leave is not compared with RSS before them: the
/// allocator keeps freed pages for reuse (mimalloc purges lazily, on later
/// allocations), so "returned" is shown as "not grown by a second round".
#[test]
fn slow_and_vanishing_clients_cost_bounded_server_memory() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&["--no-pin", "--metrics-addr", &metrics_addr]);
    let pid = d.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio_stream::StreamExt;
        // Warm up: stats computed, allocator settled.
        let mut c = minibatchd::client::Client::connect(&d.addr).await.unwrap();
        c.info().await.unwrap();
        drop(c);
        let rss0 = vm_rss(pid);
        let clients = 16;
        let mut rounds = Vec::new();
        for round in 0..2u64 {
            let mut tasks = Vec::new();
            // Clients that have read their first 3 minibatches.
            let streaming = Arc::new(AtomicU64::new(0));
            for k in 0..clients {
                let addr = d.addr.clone();
                let streaming = streaming.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = minibatchd::client::Client::connect(&addr).await.unwrap();
                    let mut r = minibatchd::client::BatchRequest::new("train", 0, 100);
                    r.order.shuffle = true; // gathered: the server allocates each minibatch
                    r.order.epoch = round * 100 + k;
                    let mut s = c.stream_batches(&r).await.unwrap();
                    for i in 0..if k % 2 == 0 { 3 } else { 20 } {
                        s.next().await.unwrap().unwrap();
                        if i == 2 {
                            streaming.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // Even k: vanish mid-epoch (drop the stream and connection).
                }));
            }
            // Every client is streaming (the odd ones have 1.7 s of slow
            // reading left).
            assert!(
                eventually(Duration::from_secs(30), || {
                    streaming.load(Ordering::Relaxed) == clients
                })
                .await,
                "round {round}: every client streams"
            );
            let during = vm_rss(pid);
            for t in tasks {
                t.await.unwrap();
            }
            // Every stream, finished or abandoned, is gone from the server.
            let maddr = metrics_addr.clone();
            let mut active = u64::MAX;
            for _ in 0..200 {
                let m = maddr.clone();
                let page = tokio::task::spawn_blocking(move || metrics_page(&m))
                    .await
                    .unwrap();
                active = metric(&page, "minibatchd_active_streams");
                if active == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(active, 0, "round {round}: streams freed when clients go");
            let after = vm_rss(pid);
            println!(
                "round {round}: daemon RSS {} MiB idle, {} MiB with {clients} slow streams, {} MiB after",
                rss0 >> 20,
                during >> 20,
                after >> 20
            );
            // Per stream: one 314 KB minibatch being sent, the HTTP/2 send
            // buffer (~0.4 MB) and what the client's flow-control window lets
            // through: 16 streams stay well under 64 MiB.
            assert!(
                during < rss0 + (64 << 20),
                "round {round}: RSS {} -> {} MiB",
                rss0 >> 20,
                during >> 20
            );
            rounds.push(during.max(after));
        }
        // What the first round's clients left behind is reused by the second.
        assert!(
            rounds[1] < rounds[0] + (16 << 20),
            "no growth from round to round: {} -> {} MiB",
            rounds[0] >> 20,
            rounds[1] >> 20
        );
    });
}
