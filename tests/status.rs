//! The status endpoints on the metrics address (README "Status page"),
//! against a real server and its real metrics listener over loopback
//! sockets: `/status.json`'s fields, streams listed while open and gone
//! after, `/minibatch.png` decoding to exactly the dataset's bytes with its
//! label strip, 4xx answers carrying GetBatch's messages, the token, the
//! page without JavaScript, attached processes; and the binary's `status`
//! and `get --png`.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, sample, Daemon, TestServer, BIN, START_UP_TIMEOUT};
use minibatchd::client::BatchRequest;
use minibatchd::proto;
use minibatchd::server::ServerOptions;
use minibatchd::status::png::{self as grid_png, Grid};
use minibatchd::status::Snapshot;
use minibatchd::store::{DType, Dataset, Set, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// A server and its metrics listener (serving the status endpoints).
struct Status {
    srv: TestServer,
    http: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Status {
    async fn start(ds: Dataset, opts: ServerOptions) -> Status {
        let srv = TestServer::start_with(ds, opts).await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(minibatchd::metrics::serve(
            l,
            srv.metrics.clone(),
            minibatchd::metrics::DEFAULT_METRICS_MAX_CONNECTIONS,
            async {
                let _ = rx.await;
            },
        ));
        let m = srv.metrics.clone();
        assert!(
            eventually(START_UP_TIMEOUT, || m.status.is_serving()).await,
            "the server never registered its dataset with the status board"
        );
        Status {
            srv,
            http,
            _stop: tx,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        get(self.http, path, &[]).await
    }

    async fn snapshot(&self) -> Snapshot {
        let a = self.get("/status.json").await;
        assert_eq!(a.status, 200, "{}", a.text());
        serde_json::from_slice(&a.body).unwrap()
    }
}

/// An HTTP answer.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// GET `path` with extra header lines, over a fresh connection.
async fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\n{}\r\n", {
            headers
                .iter()
                .map(|h| format!("{h}\r\n"))
                .collect::<String>()
        }),
    )
    .await
}

async fn raw(addr: SocketAddr, request: &str) -> Answer {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        buf
    };
    let buf = tokio::time::timeout(WAIT, work).await.expect("an answer");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head,
        body: buf[split + 4..].to_vec(),
    }
}

/// A decoded PNG: size, channels and pixel rows.
struct Image {
    w: usize,
    h: usize,
    channels: usize,
    px: Vec<u8>,
}

fn decode(png: &[u8]) -> Image {
    let mut d = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut px = vec![0; d.output_buffer_size().unwrap()];
    let info = d.next_frame(&mut px).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        c => panic!("unexpected colour type {c:?}"),
    };
    Image {
        w: info.width as usize,
        h: info.height as usize,
        channels,
        px,
    }
}

/// The float32 pixel levels of examples `[a, b)` of `x`: round(v × 255).
fn levels(x: &Tensor, a: usize, b: usize) -> Vec<u8> {
    x.rows(a, b)
        .chunks(4)
        .map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 255.0).round() as u8)
        .collect()
}

fn label(y: &Tensor, i: usize) -> i64 {
    i64::from_le_bytes(y.row(i).try_into().unwrap())
}

/// Checks every pixel of a grayscale grid of `examples` of `x` (and the
/// label strips against the labels of `y`).
fn check_gray_grid(img: &Image, x: &Tensor, y: &Tensor, a: usize, b: usize, scale: usize) {
    let n = b - a;
    let geom = grid_png::geometry(&x.shape[1..]).unwrap();
    let grid = Grid::new(n, geom, scale as u32).unwrap();
    assert_eq!(
        (img.w, img.h, img.channels),
        (grid.width().unwrap(), grid.height().unwrap(), 1)
    );
    let want = levels(x, a, b);
    let (h, w) = (geom.h, geom.w);
    for i in 0..n {
        let (x0, y0) = grid.origin(i);
        for r in 0..h * scale {
            for c in 0..w * scale {
                assert_eq!(
                    img.px[(y0 + r) * img.w + x0 + c],
                    want[i * h * w + (r / scale) * w + c / scale],
                    "image {i} pixel ({r}, {c})"
                );
            }
        }
        let strip = grid_png::strip(&label(y, a + i).to_string(), w);
        assert!(strip.contains(&grid_png::INK), "label {i} is drawn");
        for r in 0..grid_png::STRIP * scale {
            for c in 0..w * scale {
                assert_eq!(
                    img.px[(y0 + h * scale + r) * img.w + x0 + c],
                    strip[(r / scale) * w + c / scale],
                    "label strip of image {i}, ({r}, {c})"
                );
            }
        }
    }
    // The border between cells.
    assert_eq!(img.px[0], grid_png::GAP_LEVEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_describes_the_daemon_and_its_dataset() {
    let st = Status::start(sample(), ServerOptions::default()).await;
    let mut c = st.srv.client().await;
    let info = c.info().await.unwrap();
    let b = c
        .get_batch(&BatchRequest::new("train", 2, 500))
        .await
        .unwrap();
    assert_eq!(b.x.shape, [500, 784]);
    let s = st.snapshot().await;
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert!(s.uptime_s > 0.0 && s.started_unix > 1.7e9);
    assert_eq!(s.datasets.len(), 1);
    let d = &s.datasets[0];
    assert_eq!(d.name, "mnist-sample");
    assert_eq!(d.source, "mnist-sample.pkl.gz");
    assert_eq!(d.format, "pickle+gzip");
    assert_eq!(d.memory_bytes, st.srv.dataset.memory_bytes as u64);
    assert_eq!(d.tiers, ["host"]);
    assert_eq!(d.fingerprint.as_deref(), Some(info.fingerprint.as_str()));
    let names: Vec<_> = d.sets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["train", "valid", "test"]);
    let train = &d.sets[0];
    assert_eq!(train.examples, 3000);
    assert_eq!(
        (train.x.dtype.as_str(), train.x.shape.as_slice()),
        ("float32", &[784u64][..])
    );
    assert_eq!((train.y.dtype.as_str(), train.y.shape.len()), ("int64", 0));
    assert_eq!(
        train.x.sha256.as_deref(),
        info.sets[0].x.as_ref().map(|t| t.sha256.as_str())
    );
    // Throughput from the counters: one minibatch of 500 sent.
    let t = &s.throughput;
    assert_eq!(t.minibatches_total, 1);
    assert_eq!(t.bytes_total, 500 * 784 * 4 + 500 * 8);
    assert!(t.window_s > 0.0 && t.bytes_per_s > 0.0, "{t:?}");
    assert_eq!(
        s.limits.max_listed_streams,
        minibatchd::status::MAX_LISTED_STREAMS
    );
    assert_eq!(s.limits.max_png_images, 256);
    // The finished GetBatch, with its outcome, peer and trainer.
    let f = &s.finished[0];
    assert_eq!(
        (f.method.as_str(), f.set.as_str(), f.dataset.as_str()),
        ("GetBatch", "train", "mnist-sample")
    );
    assert_eq!((f.start, f.end, f.sent, f.bytes), (2, 3, 1, t.bytes_total));
    assert_eq!(f.outcome.as_deref(), Some("Ok"));
    assert!(f.peer.starts_with("127.0.0.1:"), "{}", f.peer);
    assert!(f.trainer.contains("tonic"), "user-agent: {}", f.trainer);
    assert!(s.streams.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_listed_while_open_and_go_away_after() {
    let st = Status::start(sample(), ServerOptions::default()).await;
    let mut raw = st.srv.raw_client().await;
    let mut req = tonic::Request::new(proto::StreamBatchesRequest {
        set: "train".into(),
        size: 10,
        order: Some(proto::Order {
            shuffle: true,
            seed: 7,
            epoch: 3,
            rank: 1,
            world_size: 2,
            ..Default::default()
        }),
        start: 5,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-trainer-id", "job42-rank1".parse().unwrap());
    let mut stream = raw.stream_batches(req).await.unwrap().into_inner();
    // Read one chunk; the rest of the epoch waits on flow control.
    stream.message().await.unwrap().unwrap();
    let s = st.snapshot().await;
    assert_eq!(s.streams.len(), 1, "{:?}", s.streams);
    let t = &s.streams[0];
    assert_eq!(
        (t.method.as_str(), t.dataset.as_str(), t.set.as_str()),
        ("StreamBatches", "mnist-sample", "train")
    );
    assert_eq!(
        (t.shuffle, t.seed, t.epoch, t.rank, t.world_size),
        (true, 7, 3, 1, 2)
    );
    // 3,000 examples over 2 ranks: 150 minibatches of 10 each; from 5.
    assert_eq!((t.size, t.start, t.end), (10, 5, 150));
    assert!(t.sent <= 145);
    assert_eq!(t.trainer, "job42-rank1");
    assert!(t.peer.starts_with("127.0.0.1:"), "{}", t.peer);
    assert!(t.started_unix > 1.7e9 && t.seconds >= 0.0);
    assert_eq!(s.throughput.active_streams, 1);
    // The page lists it too, without JavaScript.
    let page = st.get("/").await.text();
    assert!(page.contains("<td>StreamBatches</td>"), "{page}");
    assert!(page.contains("<td>job42-rank1</td>"));
    assert!(page.contains("<td>shuffled, seed 7, epoch 3</td>"));
    drop(stream);
    let ok = eventually(WAIT, || {
        st.srv
            .metrics
            .active_streams
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
    assert!(ok, "the stream ends when the client leaves");
    let s = st.snapshot().await;
    assert!(s.streams.is_empty(), "{:?}", s.streams);
    assert_eq!(s.finished[0].outcome.as_deref(), Some("Cancelled"));
    assert_eq!(s.finished[0].trainer, "job42-rank1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_png_is_the_minibatchs_bytes_with_its_labels() {
    let st = Status::start(sample(), ServerOptions::default()).await;
    let ds = st.srv.dataset.clone();
    let (train, test) = (&ds.sets[0], &ds.sets[2]);
    // The tutorial's minibatch 2 of 64: examples 128..192, at scale 1 and 2.
    for scale in [1, 2] {
        let a = st
            .get(&format!(
                "/minibatch.png?set=train&index=2&size=64&scale={scale}"
            ))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("content-type").as_deref(), Some("image/png"));
        assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
        check_gray_grid(&decode(&a.body), &train.x, &train.y, 128, 192, scale);
    }
    // The default scale, the explicit empty dataset, and the last, partial
    // minibatch of test (1,000 = 15 × 64 + 40).
    let a = st
        .get("/minibatch.png?dataset=&set=test&index=15&size=64")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let img = decode(&a.body);
    check_gray_grid(
        &img,
        &test.x,
        &test.y,
        960,
        1000,
        grid_png::DEFAULT_SCALE as usize,
    );
    assert_eq!(
        Grid::new(40, grid_png::geometry(&[784]).unwrap(), 1)
            .unwrap()
            .cols,
        7
    );
}

/// A dataset whose sets are not all images: "feat" ([n, 10] float32),
/// "ints" (int64 pixels), "rgb" ([n, 3, 8, 8] float32, CHW).
fn mixed() -> Dataset {
    let f32s =
        |v: Vec<f32>| Bytes::from(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
    let labels = |n: usize| {
        Tensor::new(
            DType::I64,
            vec![n],
            Bytes::from(
                (0..n as i64)
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        )
        .unwrap()
    };
    let rgb: Vec<f32> = (0..6 * 3 * 64).map(|i| (i % 256) as f32 / 255.0).collect();
    let sets = vec![
        Set {
            name: "feat".into(),
            x: Tensor::new(DType::F32, vec![20, 10], f32s(vec![0.5; 200])).unwrap(),
            y: labels(20),
        },
        Set {
            name: "ints".into(),
            x: Tensor::new(
                DType::I64,
                vec![4, 784],
                Bytes::from(vec![0u8; 4 * 784 * 8]),
            )
            .unwrap(),
            y: labels(4),
        },
        Set {
            name: "rgb".into(),
            x: Tensor::new(DType::F32, vec![6, 3, 8, 8], f32s(rgb)).unwrap(),
            y: labels(6),
        },
    ];
    let memory_bytes = sets.iter().map(|s| s.x.data.len() + s.y.data.len()).sum();
    Dataset {
        source: "mixed".into(),
        format: minibatchd::store::Format::Pickle,
        sets,
        memory_bytes,
        pin: minibatchd::memory::PinState::NotPinned("test".into()),
        memory: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_viewer_requests_get_4xx_with_grpc_messages_and_never_panic() {
    let st = Status::start(sample(), ServerOptions::default()).await;
    let mut c = st.srv.client().await;
    // The same request over gRPC and as a PNG: same message, the code as HTTP.
    for (set, index, size, status) in [
        ("nope", 0, 64, 404),
        ("train", 999_999, 64, 400),
        ("train", 0, 0, 400),
        ("train", 0, 100_000, 400),
        ("train", u64::MAX, 1, 400),
    ] {
        let e = c
            .get_batch(&BatchRequest::new(set, index, size))
            .await
            .unwrap_err();
        let grpc = match e {
            minibatchd::client::ClientError::Status(s) => s.message().to_string(),
            e => panic!("{e}"),
        };
        let a = st
            .get(&format!(
                "/minibatch.png?set={set}&index={index}&size={size}"
            ))
            .await;
        assert_eq!(a.status, status, "{set} {index} {size}: {}", a.text());
        assert_eq!(a.text().trim_end(), grpc, "{set} {index} {size}");
    }
    for (path, status, text) in [
        (
            "/minibatch.png?set=train&size=300",
            400,
            "300 images exceed the 256 one PNG shows",
        ),
        (
            "/minibatch.png?set=train&scale=9",
            400,
            "scale 9 is not within 1..=8",
        ),
        (
            "/minibatch.png?set=train&size=256&scale=8",
            400,
            "pixels, over the 4194304",
        ),
        (
            "/minibatch.png?index=abc",
            400,
            "index: \"abc\" is not a whole number",
        ),
        (
            "/minibatch.png?size=99999999999",
            400,
            "size: \"99999999999\" is not a whole number",
        ),
        (
            "/minibatch.png?dataset=other",
            404,
            "unknown dataset \"other\"; this daemon serves \"mnist-sample\"",
        ),
        (
            "/minibatch.png?%%%&&==&set=%ff%",
            404,
            "unknown set \"\u{fffd}%\"",
        ),
        ("/nothing", 404, "no page \"/nothing\" here"),
    ] {
        let a = st.get(path).await;
        assert_eq!(a.status, status, "{path}: {}", a.text());
        assert!(a.text().contains(text), "{path}: {}", a.text());
    }
    let a = raw(st.http, "POST /status.json HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(a.status, 405);
    assert_eq!(a.header("allow").as_deref(), Some("GET"));
    let a = raw(
        st.http,
        &format!("GET /?{} HTTP/1.1\r\n\r\n", "a".repeat(9000)),
    )
    .await;
    assert_eq!(a.status, 431);
    // The viewer's refusal shows on the page, which still answers.
    let a = st.get("/?set=train&index=999999").await;
    assert_eq!(a.status, 200);
    assert!(
        a.text()
            .contains("id=\"viewer-error\">400 minibatch 999999 is past the end"),
        "{}",
        a.text()
    );

    // Sets that are not images, or not float or uint8 pixels; and RGB.
    let st = Status::start(mixed(), ServerOptions::default()).await;
    let a = st.get("/minibatch.png?set=feat&size=8").await;
    assert_eq!(a.status, 400);
    assert!(
        a.text()
            .starts_with("set \"feat\": examples of shape [10] are not images"),
        "{}",
        a.text()
    );
    let a = st.get("/minibatch.png?set=ints&size=4").await;
    assert_eq!(a.status, 400);
    assert!(
        a.text()
            .contains("x is int64: the viewer draws float pixels"),
        "{}",
        a.text()
    );
    let a = st
        .get("/minibatch.png?set=rgb&index=1&size=3&scale=1")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let img = decode(&a.body);
    assert_eq!(img.channels, 3);
    let x = &st.srv.dataset.sets[2].x;
    let want = levels(x, 3, 6);
    let grid = Grid::new(3, grid_png::geometry(&[3, 8, 8]).unwrap(), 1).unwrap();
    for i in 0..3 {
        let (x0, y0) = grid.origin(i);
        for r in 0..8 {
            for col in 0..8 {
                for k in 0..3 {
                    assert_eq!(
                        img.px[((y0 + r) * img.w + x0 + col) * 3 + k],
                        want[i * 192 + k * 64 + r * 8 + col],
                        "image {i} ({r}, {col}) channel {k}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_the_status_endpoints_but_not_metrics() {
    let opts = ServerOptions {
        auth_token: Some("s3cret".into()),
        ..Default::default()
    };
    let st = Status::start(sample(), opts).await;
    for path in ["/", "/status.json", "/minibatch.png?set=train&size=4"] {
        let a = st.get(path).await;
        assert_eq!(a.status, 401, "{path}");
        assert!(
            a.text().contains("requires its bearer token"),
            "{}",
            a.text()
        );
        assert_eq!(
            a.header("www-authenticate").as_deref(),
            Some("Bearer realm=\"minibatchd\"")
        );
        let a = get(st.http, path, &["Authorization: Bearer wrong"]).await;
        assert_eq!(
            (a.status, a.text().trim()),
            (401, "invalid bearer token"),
            "{path}"
        );
        let a = get(st.http, path, &["Authorization: Bearer s3cret"]).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        let sep = if path.contains('?') { '&' } else { '?' };
        let a = st.get(&format!("{path}{sep}token=s3cret")).await;
        assert_eq!(a.status, 200, "{path}");
        let a = st.get(&format!("{path}{sep}token=s3cre")).await;
        assert_eq!(a.status, 401, "{path}");
    }
    // The page carries the token on: the image, the form, the script's fetch.
    let page = st.get("/?token=s3cret").await.text();
    assert!(page.contains("&amp;token=s3cret\""), "{page}");
    assert!(page.contains("<input type=\"hidden\" name=\"token\" value=\"s3cret\">"));
    // /metrics stays open, as before; the script holds no data.
    assert_eq!(st.get("/metrics").await.status, 200);
    assert_eq!(st.get("/status.js").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reads_without_javascript_and_escapes_what_clients_send() {
    let st = Status::start(sample(), ServerOptions::default()).await;
    let mut raw = st.srv.raw_client().await;
    let mut req = tonic::Request::new(proto::StreamBatchesRequest {
        set: "valid".into(),
        size: 5,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-trainer-id", "<script>alert(1)</script>".parse().unwrap());
    let mut stream = raw.stream_batches(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let a = st.get("/").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let csp = a.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let page = a.text();
    assert!(page.contains("<table id=\"datasets\">"), "{page}");
    assert!(
        page.contains("<td>train</td><td class=\"num\">3000</td>"),
        "{page}"
    );
    assert!(page.contains(
        "src=\"/minibatch.png?dataset=mnist-sample&amp;set=train&amp;index=0&amp;size=64&amp;scale=2\""
    ));
    assert!(page.contains("<pre class=\"labels\" id=\"labels\">"));
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!page.contains("<script>alert"));
    assert!(page.contains("<script src=\"/status.js\"></script>"));
    // The labels under the image are minibatch 0's.
    let y = &st.srv.dataset.sets[0].y;
    let first: Vec<String> = (0..8).map(|i| format!("{:>4}", label(y, i))).collect();
    assert!(page.contains(&first.join(" ")), "{page}");
    // The viewer's form asks by GET and keeps the values asked for.
    let page = st.get("/?set=test&index=3&size=10&scale=1").await.text();
    assert!(page.contains("<form method=\"get\" action=\"/\">"));
    assert!(page.contains("<option selected value=\"test\">test</option>"));
    assert!(page.contains("name=\"index\" min=\"0\" value=\"3\""));
    assert!(page.contains("examples 30..40"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_processes_are_listed_while_attached() {
    use minibatchd::attach::client::AttachOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minibatchd.sock");
    let opts = ServerOptions {
        uds: Some(minibatchd::server::UdsOptions::new(&path)),
        ..Default::default()
    };
    let st = Status::start(sample(), opts).await;
    assert!(eventually(WAIT, || path.exists()).await);
    let p = path.clone();
    let a = tokio::task::spawn_blocking(move || {
        minibatchd::client::Client::attach(p, &AttachOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    let s = st.snapshot().await;
    assert_eq!(s.datasets[0].tiers, ["host", "attach"]);
    assert_eq!(s.streams.len(), 1, "{:?}", s.streams);
    let t = &s.streams[0];
    assert_eq!(
        (t.method.as_str(), t.dataset.as_str(), t.peer.as_str()),
        ("Attach", "mnist-sample", "unix")
    );
    assert_eq!(t.pid, Some(std::process::id()));
    assert!(t.trainer.starts_with("rust "), "{}", t.trainer);
    assert_eq!(s.throughput.attached, 1);
    drop(a);
    let m = st.srv.metrics.clone();
    assert!(eventually(WAIT, || minibatchd::status::snapshot(&m).streams.is_empty()).await);
    assert_eq!(
        st.snapshot().await.finished[0].outcome.as_deref(),
        Some("detached")
    );
}

/// The binary: `status` prints the tables (and the JSON), `get --png`
/// writes the daemon's own `/minibatch.png` of the same minibatch.
#[test]
fn the_status_command_and_get_png() {
    let maddr = format!("127.0.0.1:{}", common::free_port());
    let d = Daemon::start(&["--no-pin", "--metrics-addr", &maddr, "--auth-token", "tok"]);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(BIN)
            .args(args)
            .env("MINIBATCHD_LOG", "error")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["status", "--metrics-addr", &maddr, "--token", "tok"]);
    assert!(ok, "{err}");
    for want in [
        "minibatchd ",
        "dataset mnist-sample: mnist-sample.pkl.gz (pickle+gzip)",
        "train",
        "3000",
        "float32 [784]",
        "streams (0 open):",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let (ok, out, err) = run(&[
        "status",
        "--metrics-addr",
        &maddr,
        "--token",
        "tok",
        "--json",
    ]);
    assert!(ok, "{err}");
    let s: Snapshot = serde_json::from_str(&out).unwrap();
    assert_eq!(s.datasets[0].sets[0].examples, 3000);
    let (ok, _, err) = run(&["status", "--metrics-addr", &maddr]);
    assert!(!ok);
    assert!(
        err.contains("401 Unauthorized: this daemon requires its bearer token"),
        "{err}"
    );
    let (ok, _, err) = run(&["status", "--metrics-addr", &maddr, "--watch", "0"]);
    assert!(!ok && err.contains("--watch 0"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mb.png");
    let (ok, out, err) = run(&[
        "get",
        "--server",
        &d.addr,
        "--token",
        "tok",
        "--set",
        "train",
        "--index",
        "2",
        "--size",
        "64",
        "--png",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("wrote "), "{out}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served = rt.block_on(get(
        maddr.parse().unwrap(),
        "/minibatch.png?set=train&index=2&size=64&token=tok",
        &[],
    ));
    assert_eq!(served.status, 200);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        served.body,
        "get --png draws what the daemon draws"
    );
}

/// Several datasets: all listed, streams and the viewer name theirs, and
/// a viewer request without `dataset=` is refused as GetBatch refuses one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_datasets_are_listed_and_viewed_by_name() {
    let datasets = minibatchd::catalog::Datasets::new(vec![
        ("mnist".into(), std::sync::Arc::new(sample())),
        ("mixed".into(), std::sync::Arc::new(mixed())),
    ])
    .unwrap();
    let srv = TestServer::start_datasets(datasets, ServerOptions::default()).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = l.local_addr().unwrap();
    tokio::spawn(minibatchd::metrics::serve(
        l,
        srv.metrics.clone(),
        4,
        std::future::pending(),
    ));
    let m = srv.metrics.clone();
    assert!(eventually(START_UP_TIMEOUT, || m.status.is_serving()).await);
    let a = get(http, "/status.json", &[]).await;
    let s: Snapshot = serde_json::from_slice(&a.body).unwrap();
    let names: Vec<_> = s.datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["mnist", "mixed"]);
    assert_eq!(s.datasets[1].sets[2].x.shape, [3, 8, 8]);

    // No dataset named: GetBatch's INVALID_ARGUMENT message, as 400.
    let mut raw = srv.raw_client().await;
    let grpc = raw
        .get_batch(proto::GetBatchRequest {
            set: "train".into(),
            size: 4,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let a = get(http, "/minibatch.png?set=train&size=4", &[]).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.text().trim_end(), grpc.message());
    let a = get(http, "/minibatch.png?dataset=mixed&set=rgb&size=2", &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(decode(&a.body).channels, 3);
    let page = get(http, "/?dataset=mixed&set=rgb&size=2", &[])
        .await
        .text();
    assert!(
        page.contains("<option selected value=\"mixed\">mixed</option>"),
        "{page}"
    );
    assert!(page.contains("src=\"/minibatch.png?dataset=mixed&amp;set=rgb&amp;"));

    // A stream of the second dataset names it.
    let mut stream = raw
        .stream_batches(proto::StreamBatchesRequest {
            dataset: "mixed".into(),
            set: "feat".into(),
            size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let s = minibatchd::status::snapshot(&srv.metrics);
    let listed: Vec<_> = s
        .streams
        .iter()
        .chain(&s.finished)
        .map(|t| (t.dataset.as_str(), t.set.as_str()))
        .collect();
    assert!(listed.contains(&("mixed", "feat")), "{listed:?}");
}
