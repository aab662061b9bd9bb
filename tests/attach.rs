//! Attach (README "Attach"): same-host clients map the daemon's sealed
//! memory. Against a real server on a real Unix socket: the bytes equal the
//! loaded arrays and what GetBatch / StreamBatches send, the seals hold,
//! the mapping outlives the server, and no abuse (garbage, unread replies,
//! thousands of attaches, more than `--max-attached`) leaks a descriptor or
//! stops the server.
mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{eventually, sample, TestServer, START_UP_TIMEOUT};
use minibatchd::attach::client::{AttachError, AttachOptions, Attachment};
use minibatchd::attach::{fds, header, MAGIC};
use minibatchd::client::{BatchRequest, Client};
use minibatchd::order::OrderSpec;
use minibatchd::proto;
use minibatchd::server::{ServerOptions, UdsOptions};
use minibatchd::store::DType;
use prost::Message;
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(20);

fn with_uds(path: &Path) -> ServerOptions {
    ServerOptions {
        uds: Some(UdsOptions::new(path)),
        io_threads: 2,
        ..Default::default()
    }
}

/// Attaches on a blocking thread once the server listens at `path`.
async fn attach(path: &Path, opts: AttachOptions) -> Result<Attachment, AttachError> {
    let path = path.to_path_buf();
    let t0 = Instant::now();
    loop {
        let (p, o) = (path.clone(), opts.clone());
        match tokio::task::spawn_blocking(move || Client::attach(p, &o))
            .await
            .unwrap()
        {
            Err(AttachError::Io { source, .. })
                if t0.elapsed() < START_UP_TIMEOUT
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            r => return r,
        }
    }
}

fn refused_code(r: Result<Attachment, AttachError>) -> tonic::Code {
    match r {
        Err(AttachError::Refused(s)) => s.code(),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got an attachment"),
    }
}

fn sock_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("minibatchd.sock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_bytes_equal_the_dataset_get_batch_and_stream_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir);
    let s = TestServer::start_with(sample(), with_uds(&path)).await;
    // Asked twice, a mirror comes once.
    let opts = AttachOptions {
        x_dtypes: vec![DType::U8, DType::U8],
        ..Default::default()
    };
    let a = attach(&path, opts).await.unwrap();
    assert_eq!(
        a.regions().filter(|r| r.2 == DType::U8).count(),
        3,
        "one uint8 x per set"
    );
    let mut c = s.client().await;
    let info = c.info().await.unwrap();
    assert_eq!(a.fingerprint, info.fingerprint);
    a.verify().unwrap();
    // Whole tensors are the loaded ones, byte for byte.
    for set in &s.dataset.sets {
        for (name, t) in [("x", &set.x), ("y", &set.y)] {
            let v = a.tensor(&set.name, name, Some(t.dtype)).unwrap();
            assert_eq!(v.data, &t.data[..], "{}.{name}", set.name);
            assert_eq!(v.data.as_ptr() as usize % 64, 0, "aligned in the mapping");
            assert_eq!(v.shape, t.shape);
        }
    }
    // The tutorial's minibatches are slices of the mapping and equal GetBatch.
    for (set, index, size) in [
        ("train", 0u64, 500usize),
        ("train", 5, 500),
        ("valid", 1, 600),
        ("test", 142, 7),
    ] {
        let (x, y) = a.batch(set, index, size).unwrap();
        let b = c
            .get_batch(&BatchRequest::new(set, index, size as u32))
            .await
            .unwrap();
        assert_eq!(x.data, &b.x.data[..], "{set} {index} {size}");
        assert_eq!(y.data, &b.y.data[..]);
        assert_eq!(
            x.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
            b.x.shape
        );
        let whole = a.tensor(set, "x", None).unwrap();
        let off = x.data.as_ptr() as usize - whole.data.as_ptr() as usize;
        assert_eq!(off, index as usize * size * 784 * 4, "a view, not a copy");
    }
    let past = a.batch("test", 143, 7).unwrap_err();
    assert!(past.to_string().contains("past the end"), "{past}");
    // uint8: the mirror, as GetBatch sends it.
    let (x8, _) = a.batch_as("train", 3, 100, Some(DType::U8)).unwrap();
    let mut r = BatchRequest::new("train", 3, 100);
    r.x_dtype = Some(DType::U8);
    let b8 = c.get_batch(&r).await.unwrap();
    assert_eq!(x8.data, &b8.x.data[..]);
    assert_eq!(x8.scale_divisor, b8.x.scale_divisor);
    // A shuffled, sharded epoch gathers what StreamBatches sends.
    let order = OrderSpec {
        shuffle: true,
        seed: 42,
        epoch: 3,
        rank: 1,
        world_size: 3,
        drop_last: false,
        offset: 0,
    };
    let mut r = BatchRequest::new("train", 0, 128);
    r.order = proto::Order {
        shuffle: true,
        seed: 42,
        epoch: 3,
        rank: 1,
        world_size: 3,
        drop_last: false,
        offset: 0,
    };
    // Every minibatch of the stream, gathered through the attachment.
    async fn gathered_equal_streamed(
        a: &Attachment,
        c: &mut Client,
        r: &BatchRequest,
        order: &OrderSpec,
    ) -> u64 {
        let mut stream = c.stream_batches(r).await.unwrap();
        let mut i = 0;
        while let Some(b) = stream.next().await {
            let b = b.unwrap();
            let (x, y) = a.gather("train", i, 128, order, None).unwrap();
            assert_eq!(x.data, b.x.data, "minibatch {i} of {order:?}");
            assert_eq!(y.data, b.y.data);
            i += 1;
        }
        i
    }
    assert_eq!(
        gathered_equal_streamed(&a, &mut c, &r, &order).await,
        8,
        "1,000 examples per rank in minibatches of 128"
    );
    // With an offset (elastic resume) too: 2,000 positions left, 666 per rank.
    let order = OrderSpec {
        offset: 1000,
        ..order
    };
    r.order.offset = 1000;
    assert_eq!(
        gathered_equal_streamed(&a, &mut c, &r, &order).await,
        6,
        "666 examples per rank in minibatches of 128"
    );
    let past = OrderSpec {
        offset: 3001,
        ..order
    };
    let e = a.gather("train", 0, 128, &past, None).unwrap_err();
    assert!(e.to_string().contains("offset 3001"), "{e}");
    assert_eq!(
        s.metrics
            .attach
            .attached
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(a);
    assert!(
        eventually(WAIT, || s
            .metrics
            .attach
            .attached
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0)
        .await,
        "closing detaches"
    );
}

/// The descriptors of a hand-made attach exchange (what a client that
/// misbehaves with them would hold).
fn raw_attach(path: &Path) -> (UnixStream, Vec<std::os::fd::OwnedFd>, proto::AttachResponse) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = proto::AttachRequest::default();
    let mut out = header(req.encoded_len()).to_vec();
    req.encode(&mut out).unwrap();
    s.write_all(&out).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let r = fds::recv_with_fds(s.as_raw_fd(), &mut buf, 8).unwrap();
    let mut got = r.bytes;
    while got < 16 || got < 16 + u32::from_le_bytes(buf[12..16].try_into().unwrap()) as usize {
        got += s.read(&mut buf[got..]).unwrap();
    }
    let resp = proto::AttachResponse::decode(&buf[16..got]).unwrap();
    (s, r.fds, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_refuse_writes_and_the_mapping_outlives_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir);
    let mut s = TestServer::start_with(sample(), with_uds(&path)).await;
    let a = attach(&path, AttachOptions::default()).await.unwrap();
    let generation = a.generation;
    let p = path.clone();
    let (sock, fds, _) = tokio::task::spawn_blocking(move || raw_attach(&p))
        .await
        .unwrap();
    assert!(!fds.is_empty());
    for fd in &fds {
        let fd = fd.as_raw_fd();
        // SAFETY: syscalls on descriptors we own; a mapping that succeeds
        // (it must not) is unmapped.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_eq!(p, libc::MAP_FAILED, "a writable mapping is refused");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            assert_ne!(libc::ftruncate(fd, 0), 0, "shrinking is refused");
            assert_ne!(libc::ftruncate(fd, 1 << 40), 0, "growing is refused");
            assert_ne!(
                libc::write(fd, b"x".as_ptr() as *const _, 1),
                1,
                "writing is refused"
            );
        }
    }
    drop((sock, fds));
    let before: Vec<u8> = a.tensor("train", "x", None).unwrap().data.to_vec();
    // The server goes; the mapping stays, with the same bytes.
    s.begin_shutdown();
    tokio::time::timeout(WAIT, s.handle.take().unwrap())
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    drop(s);
    assert_eq!(a.tensor("train", "x", None).unwrap().data, &before[..]);
    a.verify().unwrap();
    // A new server on the same socket is a new generation.
    let _s2 = TestServer::start_with(sample(), with_uds(&path)).await;
    let b = attach(&path, AttachOptions::default()).await.unwrap();
    assert_ne!(b.generation, generation);
    assert_eq!(b.fingerprint, a.fingerprint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_tcp_and_the_attach_limit_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir);
    let opts = ServerOptions {
        auth_token: Some("attach-token".into()),
        max_attached: 2,
        ..with_uds(&path)
    };
    let s = TestServer::start_with(sample(), opts).await;
    let token = |t: &str| AttachOptions {
        token: Some(t.into()),
        ..Default::default()
    };
    assert_eq!(
        refused_code(attach(&path, AttachOptions::default()).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        refused_code(attach(&path, token("wrong")).await),
        tonic::Code::Unauthenticated
    );
    let a1 = attach(&path, token("attach-token")).await.unwrap();
    let a2 = attach(&path, token("attach-token")).await.unwrap();
    let third = attach(&path, token("attach-token")).await;
    let Err(AttachError::Refused(st)) = third else {
        panic!("a third attach is refused")
    };
    assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    assert!(
        st.message().contains("--max-attached 2"),
        "{}",
        st.message()
    );
    drop(a1);
    let a3 = tokio::time::timeout(WAIT, async {
        loop {
            match attach(&path, token("attach-token")).await {
                Ok(a) => return a,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("a slot frees when an attachment closes");
    drop((a2, a3));
    // Over TCP the exchange is refused with FAILED_PRECONDITION.
    let addr = s.addr;
    let resp = tokio::task::spawn_blocking(move || {
        let mut t = std::net::TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(WAIT)).unwrap();
        let req = proto::AttachRequest {
            token: "attach-token".into(),
            ..Default::default()
        };
        let mut out = header(req.encoded_len()).to_vec();
        req.encode(&mut out).unwrap();
        t.write_all(&out).unwrap();
        let mut buf = Vec::new();
        t.read_to_end(&mut buf).unwrap();
        buf
    })
    .await
    .unwrap();
    assert_eq!(&resp[..8], MAGIC);
    let m = proto::AttachResponse::decode(&resp[16..]).unwrap();
    let Some(proto::attach_response::Result::Error(e)) = m.result else {
        panic!("TCP attach answered {m:?}")
    };
    assert_eq!(e.code, tonic::Code::FailedPrecondition as i32);
    assert!(e.message.contains("Unix socket"), "{}", e.message);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_leaks_no_descriptor_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir);
    let s = TestServer::start_with(sample(), with_uds(&path)).await;
    let mut c = s.client().await;
    drop(attach(&path, AttachOptions::default()).await.unwrap());
    // Settled: the first attach's connection is closed on both sides.
    let attached = || {
        s.metrics
            .attach
            .attached
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(eventually(WAIT, || attached() == 0).await);
    let baseline = open_fds();
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        let send = |bytes: &[u8]| {
            let mut s = UnixStream::connect(&p).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(bytes).unwrap();
            s
        };
        let reply_code = |mut s: UnixStream| {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            if buf.len() < 16 {
                return None;
            }
            match proto::AttachResponse::decode(&buf[16..]).ok()?.result? {
                proto::attach_response::Result::Error(e) => Some(e.code),
                _ => Some(0),
            }
        };
        let mut bad_version = header(0).to_vec();
        bad_version[8] = 9;
        assert_eq!(
            reply_code(send(&bad_version)),
            Some(tonic::Code::Unimplemented as i32)
        );
        let mut huge = header(0).to_vec();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            reply_code(send(&huge)),
            Some(tonic::Code::InvalidArgument as i32)
        );
        let mut garbage = header(5).to_vec();
        garbage.extend_from_slice(&[0xff; 5]);
        assert_eq!(
            reply_code(send(&garbage)),
            Some(tonic::Code::InvalidArgument as i32)
        );
        // A truncated body, then the client stops writing.
        let mut short = header(100).to_vec();
        short.extend_from_slice(&[0; 10]);
        let s = send(&short);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reply_code(s), Some(tonic::Code::InvalidArgument as i32));
        // Requests whose replies (and descriptors) are never read.
        for _ in 0..50 {
            drop(send(&header(0)));
        }
        // Bytes after the request end the attachment.
        let mut chatty = header(0).to_vec();
        chatty.extend_from_slice(b"more");
        drop(send(&chatty));
        // Thousands of attaches, each closed.
        for _ in 0..2_000 {
            drop(Attachment::open(&p, &AttachOptions::default()).unwrap());
        }
    })
    .await
    .unwrap();
    assert!(
        eventually(WAIT, || attached() == 0 && open_fds() <= baseline).await,
        "descriptors: {} before, {} after; {} attached",
        baseline,
        open_fds(),
        attached()
    );
    let b = c
        .get_batch(&BatchRequest::new("train", 0, 10))
        .await
        .unwrap();
    assert_eq!(b.x.shape, vec![10, 784]);
    let m = &s.metrics.attach;
    assert!(m.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2_001);
    assert!(m.refused.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_attach_requests_hold_connection_slots_and_are_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_path(&dir);
    let opts = ServerOptions {
        max_connections: 4,
        handshake_timeout: Duration::from_secs(60),
        ..with_uds(&path)
    };
    let s = TestServer::start_with(sample(), opts).await;
    drop(attach(&path, AttachOptions::default()).await.unwrap());
    let p = path.clone();
    let held = tokio::task::spawn_blocking(move || {
        (0..30)
            .map(|_| {
                let mut c = UnixStream::connect(&p).unwrap();
                c.write_all(MAGIC).unwrap();
                c
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let conns = &s.metrics.conns;
    assert!(
        eventually(WAIT, || conns
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 26)
        .await,
        "newcomers evict the oldest unfinished requests"
    );
    assert!(conns.open.load(std::sync::atomic::Ordering::Relaxed) <= 4);
    // A real client still gets in, and detaches.
    let a = attach(&path, AttachOptions::default()).await.unwrap();
    assert_eq!(a.batch("test", 0, 1).unwrap().1.shape, vec![1]);
    drop(held);
}
