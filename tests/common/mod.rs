//! Shared fixture: a real minibatchd server on a loopback port, a real tonic
//! client, and deterministic datasets.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use minibatchd::client::Client;
use minibatchd::load::{self, LoadOptions, PinPolicy};
use minibatchd::memory::PinState;
use minibatchd::metrics::Metrics;
use minibatchd::server::ServerOptions;
use minibatchd::store::{DType, Dataset, Format, Set, Tensor};

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dataset = Arc::new(dataset);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(minibatchd::server::run(
            listener,
            dataset.clone(),
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

    pub async fn client(&self) -> Client {
        // The listener is bound before `run` starts, so connecting can only
        // race the server's first poll; retry briefly.
        for _ in 0..50 {
            if let Ok(c) = Client::connect(&self.addr.to_string()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot connect to test server at {}", self.addr);
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
