//! Shared fixture: a real minibatchd server on a loopback port, a real tonic
//! client, and deterministic datasets.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use minibatchd::catalog::Datasets;
use minibatchd::client::{Batch, Client, ClientError};
use minibatchd::load::{self, LoadOptions, PinPolicy};
use minibatchd::memory::PinState;
use minibatchd::metrics::Metrics;
use minibatchd::proto::batch_service_client::BatchServiceClient;
use minibatchd::server::ServerOptions;
use minibatchd::store::{DType, Dataset, Format, Set, Tensor};

/// How long a test server or daemon may take to serve.
pub const START_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A server running in this process; shuts down when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dataset: Arc<Dataset>,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(dataset: Dataset) -> Self {
        Self::start_with(dataset, ServerOptions::default()).await
    }

    pub async fn start_with(dataset: Dataset, opts: ServerOptions) -> Self {
        Self::start_datasets(Datasets::one(Arc::new(dataset)), opts).await
    }

    /// A server of several named datasets; `dataset` is the first.
    pub async fn start_datasets(datasets: Datasets, opts: ServerOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dataset = datasets.iter().next().expect("a dataset").1.clone();
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(minibatchd::server::run(
            listener,
            datasets,
            opts,
            metrics.clone(),
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            dataset,
            metrics,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// A client of the server, once it serves: bounded by
    /// [`START_UP_TIMEOUT`], and failing at once when the server exited.
    pub async fn client(&self) -> Client {
        // The listener is bound before `run` starts, so connecting can only
        // race the server's first poll; retry briefly.
        let addr = self.addr.to_string();
        let connect = async {
            loop {
                if let Ok(c) = Client::connect(&addr).await {
                    return c;
                }
                if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                    panic!("test server at {addr} exited before serving");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(START_UP_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("cannot connect to test server at {addr}"))
    }

    /// A plain tonic client of the service (no checks of its own), for
    /// requests the Rust client would not send.
    pub async fn raw_client(&self) -> BatchServiceClient<tonic::transport::Channel> {
        let connect = BatchServiceClient::connect(format!("http://{}", self.addr));
        tokio::time::timeout(START_UP_TIMEOUT, connect)
            .await
            .expect("test server answers")
            .unwrap()
    }

    /// Asks the server to shut down (graceful) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// The bundled sample of real digits, loaded the way the daemon loads it.
pub fn sample() -> Dataset {
    load::load_bytes(
        Path::new(minibatchd::BUNDLED_SAMPLE_NAME),
        minibatchd::BUNDLED_SAMPLE,
        &LoadOptions {
            pin: PinPolicy::Off,
            ..Default::default()
        },
    )
    .expect("bundled sample loads")
}

/// xorshift, so fixtures need no dependency and never change.
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn f32_tensor(n: usize, d: usize, f: impl FnMut() -> f32) -> Tensor {
    let mut f = f;
    let v: Vec<u8> = (0..n * d).flat_map(|_| f().to_le_bytes()).collect();
    Tensor::new(DType::F32, vec![n, d], Bytes::from(v)).unwrap()
}

fn labels(n: usize, r: &mut impl FnMut() -> u64) -> Tensor {
    let v: Vec<u8> = (0..n)
        .flat_map(|_| ((r() % 10) as i64).to_le_bytes())
        .collect();
    Tensor::new(DType::I64, vec![n], Bytes::from(v)).unwrap()
}

/// A synthetic dataset: "train" 12,000 x 784 float32 pixels k/256 (so a
/// 10,000-example minibatch exists), "valid" 1,000 x 16 arbitrary floats
/// (no exact narrow form), "test" 1,003 x 784 k/256.
pub fn synthetic() -> Dataset {
    let mut r = rng(7);
    let mut px = rng(11);
    let mut pixel = move || (px() % 256) as f32 / 256.0;
    let train = Set {
        name: "train".into(),
        x: f32_tensor(12_000, 784, &mut pixel),
        y: labels(12_000, &mut r),
    };
    let mut fr = rng(13);
    let valid = Set {
        name: "valid".into(),
        x: f32_tensor(1_000, 16, move || (fr() % 1_000_000) as f32 / 7.0),
        y: labels(1_000, &mut r),
    };
    let test = Set {
        name: "test".into(),
        x: f32_tensor(1_003, 784, &mut pixel),
        y: labels(1_003, &mut r),
    };
    let sets = vec![train, valid, test];
    let memory_bytes = sets.iter().map(|s| s.x.data.len() + s.y.data.len()).sum();
    Dataset {
        source: "synthetic".into(),
        format: Format::Pickle,
        sets,
        memory_bytes,
        pin: PinState::NotPinned("test".into()),
        memory: vec![],
    }
}

/// Resident set size of a process (`/proc/PID/status` VmRSS), in bytes.
pub fn vm_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kb * 1024
}

/// A throwaway PKI in a temporary directory: `ca.pem`, a server
/// certificate for "localhost" (`server.pem`, `server.key`) and a client
/// certificate (`client.pem`, `client.key`) signed by the CA.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.pem", ca.pem());
        for (name, sans) in [
            ("server", vec!["localhost".to_string()]),
            ("client", vec!["trainer".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestPki { dir }
    }

    pub fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }

    /// Server TLS files, with mutual TLS when `mtls`.
    pub fn server_files(&self, mtls: bool) -> minibatchd::access::TlsFiles {
        minibatchd::access::TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mtls.then(|| self.path("ca.pem")),
        }
    }

    /// Client options that verify the server and present the client
    /// certificate.
    pub fn client_options(&self) -> minibatchd::client::ClientOptions {
        minibatchd::client::ClientOptions {
            tls_ca: Some(self.path("ca.pem")),
            tls_identity: Some((self.path("client.pem"), self.path("client.key"))),
            ..Default::default()
        }
    }
}

/// The status code of a client error that must be a gRPC status.
pub fn code(e: ClientError) -> tonic::Code {
    match e {
        ClientError::Status(s) => s.code(),
        other => panic!("expected a status, got {other}"),
    }
}

/// The values of an int64 tensor's bytes (little-endian).
pub fn int64s(data: &[u8]) -> Vec<i64> {
    data.chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The example indices of a minibatch asked `with_indices`.
pub fn indices(b: &Batch) -> Vec<usize> {
    let t = b.indices.as_ref().expect("asked with indices");
    int64s(&t.data).into_iter().map(|i| i as usize).collect()
}

/// Polls `f` every 20 ms until it holds or `limit` passes; whether it held.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The real binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_minibatchd");

/// Runs the binary with `args` (logging errors only) and waits for it.
pub fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("MINIBATCHD_LOG", "error")
        .output()
        .expect("binary runs")
}

/// Port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary serving on a free loopback port, its stderr in a log
/// file; killed when dropped (its log then printed if the test failed).
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// `serve --addr ADDR` with `extra` (and `--metrics-addr off` unless
    /// `extra` sets it), once health says SERVING.
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_with(extra, |_| {})
    }

    /// As [`Daemon::start`], with `configure` applied to the command
    /// (environment, limits) before it is spawned.
    pub fn start_with(extra: &[&str], configure: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--addr", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if !extra.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        configure(&mut cmd);
        let mut d = Daemon {
            child: cmd.spawn().unwrap(),
            addr,
            log,
            _dir: dir,
        };
        let t0 = Instant::now();
        while !d.healthy() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!(
                    "daemon exited before it became healthy: {st}\n{}",
                    d.log_text()
                );
            }
            assert!(
                t0.elapsed() < START_UP_TIMEOUT,
                "daemon did not become healthy:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Waits until every one of `lines` is in the log, for at most `limit`.
    pub fn wait_for_log(&self, lines: &[&str], limit: Duration) {
        let t0 = Instant::now();
        while !lines.iter().all(|l| self.log_text().contains(l)) {
            assert!(
                t0.elapsed() < limit,
                "{lines:?} not logged within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn healthy(&self) -> bool {
        run(&["health", "--server", &self.addr]).status.success()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log_text());
        }
    }
}

/// A request as a gRPC message (prefix and bytes), for raw HTTP/2 clients.
pub fn grpc(m: &impl prost::Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut b = bytes::BytesMut::with_capacity(grpc_frames::PREFIX + body.len());
    b.extend_from_slice(
        &grpc_frames::Prefix::uncompressed(body.len())
            .expect("a small message")
            .to_bytes(),
    );
    b.extend_from_slice(&body);
    b.freeze()
}

/// A ustar (POSIX) archive of regular files `(name, bytes)`, as `tar`
/// writes one: 512-byte headers with octal sizes and checksums, data
/// padded to 512 bytes, two zero blocks at the end.
pub fn ustar<N: AsRef<str>, D: AsRef<[u8]>>(files: &[(N, D)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (name, data) in files {
        let (name, data) = (name.as_ref(), data.as_ref());
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..265].copy_from_slice(b"ustar\x0000");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| c as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        v.extend(h);
        v.extend(data);
        v.resize(v.len().next_multiple_of(512), 0);
    }
    v.extend([0u8; 1024]);
    v
}

/// A CIFAR batch dict as Python 2's cPickle wrote it (protocol 2, str keys
/// as SHORT_BINSTRING): `data` uint8 [n, 3072] through numpy's
/// `_reconstruct` (BINSTRING payload: byte i is `pixel(i)`), then each
/// `(key, labels)` as a list of small ints (`labels` for CIFAR-10,
/// `fine_labels` and `coarse_labels` for CIFAR-100).
pub fn py2_cifar_batch(n: usize, pixel: impl Fn(usize) -> u8, labels: &[(&str, &[u8])]) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x01(U\x04dataq\x02".to_vec();
    p.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04K\x00\x85U\x01b\x87Rq\x05");
    p.extend(b"(K\x01K");
    p.push(n as u8);
    p.extend(b"M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01\x87Rq\x07");
    p.extend(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T");
    p.extend(((n * 3072) as i32).to_le_bytes());
    p.extend((0..n * 3072).map(pixel));
    p.extend(b"tb");
    for (key, labels) in labels {
        p.push(b'U');
        p.push(key.len() as u8);
        p.extend(key.as_bytes());
        p.extend(b"](");
        for &l in *labels {
            p.extend([b'K', l]);
        }
        p.extend(b"e");
    }
    p.extend(b"u.");
    p
}
