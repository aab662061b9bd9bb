//! The gRPC contract, end to end: a real server on a loopback port and the
//! real tonic client, for every RPC and status code.
mod common;

use common::{code, indices, int64s, sample, synthetic, TestServer};
use minibatchd::client::{BatchRequest, Client, ClientOptions};
use minibatchd::proto;
use minibatchd::server::ServerOptions;
use minibatchd::store::{DType, Dataset};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn rows(ds: &Dataset, set: &str, name: &str, idx: &[usize]) -> Vec<u8> {
    let s = ds.set(set).unwrap();
    let t = if name == "x" { &s.x } else { &s.y };
    idx.iter().flat_map(|&i| t.row(i).to_vec()).collect()
}

#[tokio::test]
async fn get_info_describes_the_dataset() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    let info = c.info().await.unwrap();
    let names: Vec<_> = info
        .sets
        .iter()
        .map(|s| (s.name.as_str(), s.examples))
        .collect();
    assert_eq!(
        names,
        vec![("train", 3000), ("valid", 1000), ("test", 1000)]
    );
    let x = info.sets[0].x.clone().unwrap();
    assert_eq!(x.dtype, proto::Dtype::Float32 as i32);
    assert_eq!(x.shape, vec![784]);
    assert_eq!(x.scale_divisor, 256);
    assert!(x.wire_dtypes.contains(&(proto::Dtype::Uint8 as i32)));
    let y = info.sets[0].y.clone().unwrap();
    assert_eq!(y.dtype, proto::Dtype::Int64 as i32);
    assert_eq!(info.sets[0].classes, (0..10).collect::<Vec<i64>>());
    let stats = minibatchd::analyze::dataset_stats(&srv.dataset);
    assert_eq!(info.fingerprint, stats.fingerprint);
    assert_eq!(x.sha256, stats.get("train", "x").unwrap().sha256);
    assert_eq!(info.source, "mnist-sample.pkl.gz");
    assert_eq!(info.format, "pickle+gzip");
    let l = info.limits.unwrap();
    assert_eq!(l.max_message_bytes, 4 << 20);
    assert!(
        l.chunk_bytes as usize + minibatchd::batch::frame::MESSAGE_OVERHEAD
            <= l.max_message_bytes as usize
    );
    assert_eq!(info.server_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn minibatches_are_the_loaded_bytes() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    // 3000 examples in minibatches of 700: 0..700, ..., 2800..3000 (partial).
    for (index, range) in [(0u64, 0..700), (2, 1400..2100), (4, 2800..3000)] {
        let b = c
            .get_batch(&BatchRequest::new("train", index, 700))
            .await
            .unwrap();
        let idx: Vec<usize> = range.collect();
        assert_eq!(b.index, index);
        assert_eq!(b.x.shape, vec![idx.len() as u64, 784]);
        assert_eq!(b.y.shape, vec![idx.len() as u64]);
        assert_eq!(b.x.dtype, DType::F32);
        assert_eq!(
            b.x.data,
            rows(&srv.dataset, "train", "x", &idx),
            "x of minibatch {index}"
        );
        assert_eq!(
            b.y.data,
            rows(&srv.dataset, "train", "y", &idx),
            "y of minibatch {index}"
        );
    }
}

/// The clients' opt-in busy polling (issue 18) changes how a GetBatch
/// waits, not what it returns: the same minibatches, the same errors, also
/// when the budget runs out before the answer is in.
#[tokio::test]
async fn busy_polling_clients_get_the_same_answers() {
    let srv = TestServer::start(sample()).await;
    let mut plain = srv.client().await;
    for budget in [Duration::from_millis(50), Duration::from_nanos(1)] {
        let opts = ClientOptions {
            busy_poll: budget,
            ..Default::default()
        };
        let mut busy = Client::connect_with(&srv.addr.to_string(), &opts)
            .await
            .unwrap();
        for index in [0u64, 4] {
            let r = BatchRequest::new("train", index, 700);
            assert_eq!(
                busy.get_batch(&r).await.unwrap(),
                plain.get_batch(&r).await.unwrap(),
                "minibatch {index}, busy polling for {budget:?}"
            );
        }
        let e = busy
            .get_batch(&BatchRequest::new("train", 5, 700))
            .await
            .unwrap_err();
        assert_eq!(code(e), Code::OutOfRange);
    }
}

#[tokio::test]
async fn status_codes_for_bad_requests() {
    let srv = TestServer::start(synthetic()).await;
    let mut c = srv.client().await;
    let e = c
        .get_batch(&BatchRequest::new("train", 24, 500))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::OutOfRange);
    let e = c
        .get_batch(&BatchRequest::new("train", 0, 0))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::InvalidArgument);
    let e = c
        .get_batch(&BatchRequest::new("train", 0, 16_385))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::InvalidArgument);
    let e = c
        .get_batch(&BatchRequest::new("training", 0, 10))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::NotFound);
    let mut r = BatchRequest::new("train", 0, 10);
    r.order.rank = 3;
    r.order.world_size = 2;
    assert_eq!(
        code(c.get_batch(&r).await.unwrap_err()),
        Code::InvalidArgument
    );
    // valid's floats are not k/256: no exact uint8, float16 or bfloat16.
    for d in [DType::U8, DType::F16, DType::BF16] {
        let mut r = BatchRequest::new("valid", 0, 10);
        r.x_dtype = Some(d);
        assert_eq!(
            code(c.get_batch(&r).await.unwrap_err()),
            Code::FailedPrecondition,
            "{d}"
        );
    }
    let mut r = BatchRequest::new("train", 0, 10);
    r.y_dtype = Some(DType::U8);
    assert_eq!(
        code(c.get_batch(&r).await.unwrap_err()),
        Code::FailedPrecondition
    );
    // A dtype number the contract does not define.
    let mut raw = srv.raw_client().await;
    let e = raw
        .get_batch(proto::GetBatchRequest {
            set: "train".into(),
            index: 0,
            size: 1,
            x_dtype: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .stream_batches(proto::StreamBatchesRequest {
            set: "train".into(),
            size: 500,
            start: 24,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    // The server still serves after all that.
    assert_eq!(
        c.get_batch(&BatchRequest::new("train", 23, 500))
            .await
            .unwrap()
            .x
            .shape,
        vec![500, 784]
    );
}

#[tokio::test]
async fn a_minibatch_larger_than_a_chunk_arrives_whole_in_small_messages() {
    let srv = TestServer::start(synthetic()).await;
    let mut raw = srv.raw_client().await;
    let mut s = raw
        .get_batch(proto::GetBatchRequest {
            set: "train".into(),
            index: 0,
            size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(m) = s.next().await {
        chunks.push(m.unwrap());
    }
    let x: Vec<_> = chunks.iter().filter(|c| c.name == "x").collect();
    assert!(x.len() >= 30, "31 MB in {} chunks", x.len());
    assert!(chunks
        .iter()
        .all(|c| prost::Message::encoded_len(c) < 4 << 20));
    assert!(chunks.iter().all(|c| crc32c::crc32c(&c.data) == c.crc32c));
    assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
    assert!(chunks.last().unwrap().last);
    assert_eq!(x[0].shape, vec![10_000, 784]);
    let mut c = srv.client().await;
    let b = c
        .get_batch(&BatchRequest::new("train", 0, 10_000))
        .await
        .unwrap();
    let idx: Vec<usize> = (0..10_000).collect();
    assert_eq!(b.x.data.len(), 10_000 * 784 * 4);
    assert_eq!(b.x.data, rows(&srv.dataset, "train", "x", &idx));
    // minibatch 1 of 10,000 is examples 10,000..12,000: partial, 2,000.
    let b = c
        .get_batch(&BatchRequest::new("train", 1, 10_000))
        .await
        .unwrap();
    assert_eq!(b.x.shape, vec![2000, 784]);
    assert_eq!(
        b.y.data,
        rows(
            &srv.dataset,
            "train",
            "y",
            &(10_000..12_000).collect::<Vec<_>>()
        )
    );
}

async fn epoch(
    c: &mut Client,
    set: &str,
    size: u32,
    order: proto::Order,
    start: u64,
) -> Vec<minibatchd::client::Batch> {
    let mut r = BatchRequest::new(set, start, size);
    r.order = order;
    r.with_indices = true;
    let s = c.stream_batches(&r).await.unwrap();
    s.map(|b| b.unwrap()).collect().await
}

#[tokio::test]
async fn shuffles_are_reproducible_across_servers_and_differ_by_epoch() {
    let a = TestServer::start(sample()).await;
    let b = TestServer::start(sample()).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let order = proto::Order {
        shuffle: true,
        seed: 1234,
        epoch: 5,
        ..Default::default()
    };
    let ea = epoch(&mut ca, "train", 500, order, 0).await;
    let eb = epoch(&mut cb, "train", 500, order, 0).await;
    assert_eq!(ea.len(), 6);
    assert_eq!(ea, eb, "same seed and epoch on two servers");
    let all: Vec<usize> = ea.iter().flat_map(indices).collect();
    assert_eq!(
        all,
        minibatchd::order::permutation(3000, 1234, 5)
            .iter()
            .map(|&i| i as usize)
            .collect::<Vec<_>>()
    );
    for batch in &ea {
        assert_eq!(
            batch.x.data,
            rows(&a.dataset, "train", "x", &indices(batch))
        );
        assert_eq!(
            batch.y.data,
            rows(&a.dataset, "train", "y", &indices(batch))
        );
    }
    let next = epoch(&mut ca, "train", 500, proto::Order { epoch: 6, ..order }, 0).await;
    assert_ne!(
        indices(&next[0]),
        indices(&ea[0]),
        "another epoch, another order"
    );
    // GetBatch of one shuffled minibatch equals that minibatch of the stream.
    let mut r = BatchRequest::new("train", 3, 500);
    r.order = order;
    assert_eq!(ca.get_batch(&r).await.unwrap().x, ea[3].x);
}

#[tokio::test]
async fn shards_of_all_ranks_are_disjoint_equal_and_cover() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    for shuffle in [false, true] {
        let mut seen = Vec::new();
        let mut lens = Vec::new();
        for rank in 0..7 {
            let order = proto::Order {
                shuffle,
                seed: 9,
                epoch: 0,
                rank,
                world_size: 7,
                drop_last: false,
                offset: 0,
            };
            let e = epoch(&mut c, "valid", 64, order, 0).await;
            let idx: Vec<usize> = e.iter().flat_map(indices).collect();
            lens.push(idx.len());
            seen.extend(idx);
        }
        // 1000 examples over 7 ranks: 142 each, 6 dropped.
        assert!(lens.iter().all(|&l| l == 142), "{lens:?}");
        let mut s = seen.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 994, "disjoint");
    }
    let order = proto::Order {
        world_size: 7,
        rank: 1,
        drop_last: true,
        ..Default::default()
    };
    let e = epoch(&mut c, "valid", 64, order, 0).await;
    assert_eq!(e.len(), 2, "142 examples in full minibatches of 64");
    assert_eq!(indices(&e[0])[..3], [1, 8, 15]);
}

/// The documented rule with an offset, written out: rank's shard of the
/// order (the permutation, or 0..n) cut to [offset, n) before sharding.
fn shard_after(n: usize, order: proto::Order) -> Vec<usize> {
    let base: Vec<usize> = if order.shuffle {
        minibatchd::order::permutation(n, order.seed, order.epoch)
            .iter()
            .map(|&i| i as usize)
            .collect()
    } else {
        (0..n).collect()
    };
    let rest = &base[order.offset as usize..];
    let w = order.world_size.max(1) as usize;
    rest[..rest.len() / w * w]
        .iter()
        .skip(order.rank as usize)
        .step_by(w)
        .copied()
        .collect()
}

#[tokio::test]
async fn offset_resumes_an_epoch_in_another_world_size() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    for shuffle in [true, false] {
        let order = |rank, world_size, offset| proto::Order {
            shuffle,
            seed: 21,
            epoch: 4,
            rank,
            world_size,
            drop_last: false,
            offset,
        };
        let mut seen = vec![0u32; 3000];
        // World 4: 3 minibatches of 128 on every rank, then a checkpoint.
        for rank in 0..4 {
            let mut r = BatchRequest::new("train", 0, 128);
            r.order = order(rank, 4, 0);
            r.count = 3;
            r.with_indices = true;
            let s = c.stream_batches(&r).await.unwrap();
            let got: Vec<_> = s.map(|b| b.unwrap()).collect().await;
            assert_eq!(got.len(), 3);
            for b in &got {
                indices(b).iter().for_each(|&i| seen[i] += 1);
            }
        }
        // World 5 resumes at offset 3*128*4 = 1536: 1464 positions left,
        // 1460 in shards of 292, the last 4 left out.
        let offset = 3 * 128 * 4;
        for rank in 0..5 {
            let o = order(rank, 5, offset);
            let e = epoch(&mut c, "train", 100, o, 0).await;
            assert_eq!(e.len(), 3, "292 examples in minibatches of 100");
            let idx: Vec<usize> = e.iter().flat_map(indices).collect();
            assert_eq!(idx, shard_after(3000, o), "rank {rank}");
            for b in &e {
                assert_eq!(b.x.data, rows(&srv.dataset, "train", "x", &indices(b)));
                assert_eq!(b.y.data, rows(&srv.dataset, "train", "y", &indices(b)));
            }
            idx.iter().for_each(|&i| seen[i] += 1);
            // GetBatch agrees with the stream.
            let mut r = BatchRequest::new("train", 2, 100);
            r.order = o;
            assert_eq!(c.get_batch(&r).await.unwrap().x, e[2].x);
        }
        let full = shard_after(3000, order(0, 1, 0));
        let counts: Vec<u32> = full.iter().map(|&i| seen[i]).collect();
        assert!(counts[..2996].iter().all(|&k| k == 1), "{shuffle}");
        assert_eq!(counts[2996..], [0, 0, 0, 0], "the remainder's tail");
    }
    // Unshuffled and unsharded: the tutorial's rule shifted by offset.
    let o = proto::Order {
        offset: 2950,
        ..Default::default()
    };
    let e = epoch(&mut c, "train", 20, o, 0).await;
    let lens: Vec<usize> = e.iter().map(|b| indices(b).len()).collect();
    assert_eq!(lens, [20, 20, 10]);
    assert_eq!(indices(&e[0])[0], 2950);
    assert_eq!(
        e[2].x.data,
        rows(
            &srv.dataset,
            "train",
            "x",
            &(2990..3000).collect::<Vec<_>>()
        )
    );
}

/// The error a refused StreamBatches ends with (at the call, or as the
/// stream's first item).
async fn stream_error(c: &mut Client, r: &BatchRequest) -> minibatchd::client::ClientError {
    match c.stream_batches(r).await {
        Err(e) => e,
        Ok(s) => {
            let first: Vec<_> = s.take(1).collect().await;
            match first.into_iter().next() {
                Some(Err(e)) => e,
                _ => panic!("the stream was not refused"),
            }
        }
    }
}

#[tokio::test]
async fn offset_at_and_past_the_end() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    let order = |offset| proto::Order {
        shuffle: true,
        world_size: 2,
        rank: 1,
        offset,
        ..Default::default()
    };
    // At the end (or a remainder shorter than the world): the epoch is
    // finished, an empty stream from start 0.
    for offset in [3000, 2999] {
        assert!(epoch(&mut c, "train", 10, order(offset), 0)
            .await
            .is_empty());
        let mut r = BatchRequest::new("train", 1, 10);
        r.order = order(offset);
        let e = stream_error(&mut c, &r).await;
        assert_eq!(code(e), Code::OutOfRange, "start 1 of an empty order");
        r.index = 0;
        assert_eq!(code(c.get_batch(&r).await.unwrap_err()), Code::OutOfRange);
    }
    // Past the end: INVALID_ARGUMENT, naming offset and n.
    for offset in [3001, u64::MAX] {
        let mut r = BatchRequest::new("train", 0, 10);
        r.order = order(offset);
        let e = c.get_batch(&r).await.unwrap_err();
        let minibatchd::client::ClientError::Status(st) = e else {
            panic!("expected a status, got {e}")
        };
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(
            st.message().contains(&format!("offset {offset}"))
                && st.message().contains("3000 examples"),
            "{}",
            st.message()
        );
        let e = stream_error(&mut c, &r).await;
        assert_eq!(code(e), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn resume_gives_the_tail_of_the_stream() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    let order = proto::Order {
        shuffle: true,
        seed: 3,
        epoch: 1,
        ..Default::default()
    };
    let full = epoch(&mut c, "train", 256, order, 0).await;
    let tail = epoch(&mut c, "train", 256, order, 5).await;
    assert_eq!(full.len(), 12);
    assert_eq!(&full[5..], &tail[..]);
    assert_eq!(tail[0].index, 5);
    let mut r = BatchRequest::new("train", 2, 256);
    r.order = order;
    r.count = 3;
    let s: Vec<_> = c
        .stream_batches(&r)
        .await
        .unwrap()
        .map(|b| b.unwrap().index)
        .collect()
        .await;
    assert_eq!(s, vec![2, 3, 4]);
}

#[tokio::test]
async fn wire_conversions_are_exact() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    let mut r = BatchRequest::new("test", 1, 300);
    let f32s = c.get_batch(&r).await.unwrap();
    let want: Vec<f32> = f32s
        .x
        .data
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    r.x_dtype = Some(DType::U8);
    r.y_dtype = Some(DType::I32);
    let u8s = c.get_batch(&r).await.unwrap();
    assert_eq!(u8s.x.dtype, DType::U8);
    assert_eq!(u8s.x.scale_divisor, 256);
    assert_eq!(u8s.x.data.len(), want.len());
    let back: Vec<f32> = u8s.x.data.iter().map(|&b| b as f32 / 256.0).collect();
    assert_eq!(back, want);
    let labels = int64s(&f32s.y.data);
    let l32: Vec<i64> = u8s
        .y
        .data
        .chunks(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
        .collect();
    assert_eq!(l32, labels);
    r.y_dtype = None;
    r.x_dtype = Some(DType::F16);
    let h = c.get_batch(&r).await.unwrap();
    let back: Vec<f32> =
        h.x.data
            .chunks(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
    assert_eq!(back, want);
    r.x_dtype = Some(DType::BF16);
    let h = c.get_batch(&r).await.unwrap();
    let back: Vec<f32> =
        h.x.data
            .chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
    assert_eq!(back, want);
    r.x_dtype = Some(DType::F32);
    assert_eq!(
        c.get_batch(&r).await.unwrap().x,
        f32s.x,
        "asking for the stored dtype is a no-op"
    );
}

#[tokio::test]
async fn health_reflection_and_metrics_answer() {
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    assert!(c.health().await.unwrap());
    c.get_batch(&BatchRequest::new("train", 0, 100))
        .await
        .unwrap();

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", srv.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"minibatch.v1.BatchService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let text = srv.metrics.render();
    assert!(
        text.contains("minibatchd_requests_total{method=\"GetBatch\",code=\"Ok\"} 1"),
        "{text}"
    );
    let name = minibatchd::catalog::name_from_path(std::path::Path::new(&srv.dataset.source));
    assert!(
        text.contains(&format!(
            "minibatchd_minibatches_total{{method=\"GetBatch\",dataset=\"{name}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "minibatchd_sent_bytes_total{{method=\"GetBatch\",dataset=\"{name}\"}} {}",
            100 * 784 * 4 + 100 * 8
        )),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_finishes_streams_in_flight() {
    let mut srv = TestServer::start(synthetic()).await;
    let mut c = srv.client().await;
    let mut r = BatchRequest::new("train", 0, 1000);
    r.count = 12;
    let mut s = c.stream_batches(&r).await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.index, 0);
    srv.begin_shutdown();
    // The health flip is asynchronous: poll for it (bounded) instead of
    // guessing how long a loaded CI machine needs.
    let mut probe = srv.client().await;
    let mut serving = true;
    for _ in 0..200 {
        serving = probe.health().await.unwrap();
        if !serving {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!serving, "NOT_SERVING while draining");
    let rest: Vec<_> = s
        .map(|b| b.map(|b| b.index).map_err(|e| e.to_string()))
        .collect()
        .await;
    let rest: Vec<u64> = rest
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("stream failed during shutdown: {e}")))
        .collect();
    assert_eq!(
        rest,
        (1..12).collect::<Vec<_>>(),
        "the stream in flight completes"
    );
    let h = srv.handle.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), h)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    // Stopped means stopped: the listening socket is closed (new clients
    // are refused at once) and so is the connection that was open.
    assert!(
        tokio::net::TcpStream::connect(srv.addr).await.is_err(),
        "nothing listens after the server stopped"
    );
    assert!(c.health().await.is_err(), "open connections are closed");
}

/// Connections are spread over the serving threads (each its own runtime):
/// with more clients than threads, every client gets the right bytes,
/// concurrently, whatever thread serves it.
#[tokio::test]
async fn connections_are_served_on_every_io_thread() {
    for io_threads in [1, 3] {
        let srv = TestServer::start_with(
            synthetic(),
            ServerOptions {
                io_threads,
                ..Default::default()
            },
        )
        .await;
        let mut tasks = Vec::new();
        for k in 0..5u64 {
            let mut c = srv.client().await;
            let ds = srv.dataset.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..6 {
                    let index = (k * 6 + i) % 20;
                    let b = c
                        .get_batch(&BatchRequest::new("train", index, 100))
                        .await
                        .unwrap();
                    let want: Vec<usize> =
                        (index as usize * 100..index as usize * 100 + 100).collect();
                    assert_eq!(&b.x.data[..], &rows(&ds, "train", "x", &want)[..]);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test]
async fn clients_choose_their_chunk_size_within_the_message_limit() {
    let srv = TestServer::start(synthetic()).await;
    let mut raw = srv.raw_client().await;
    for (asked, most) in [
        (64 << 10, 64 << 10),
        (
            u32::MAX,
            (4 << 20) - minibatchd::batch::frame::MESSAGE_OVERHEAD,
        ),
    ] {
        let req = proto::GetBatchRequest {
            set: "train".into(),
            index: 0,
            size: 3000,
            max_chunk_bytes: asked,
            ..Default::default()
        };
        let mut s = raw.get_batch(req).await.unwrap().into_inner();
        let mut got = Vec::new();
        while let Some(m) = s.next().await {
            let m = m.unwrap();
            assert!(m.data.len() <= most, "{} > {most}", m.data.len());
            assert_eq!(crc32c::crc32c(&m.data), m.crc32c);
            if m.name == "x" {
                got.extend_from_slice(&m.data);
            }
        }
        assert_eq!(
            got,
            rows(&srv.dataset, "train", "x", &(0..3000).collect::<Vec<_>>())
        );
    }
    // The Rust client asks for whole messages: a 500-image minibatch is one
    // message, and its tensor is that message's buffer.
    let mut c = srv.client().await;
    let b = c
        .get_batch(&BatchRequest::new("train", 3, 500))
        .await
        .unwrap();
    assert_eq!(
        b.x.data,
        rows(
            &srv.dataset,
            "train",
            "x",
            &(1500..2000).collect::<Vec<_>>()
        )
    );
}

/// The first uint8 request of a set starts its uint8 mirror; minibatches
/// served while it builds (converted per request) and after (sliced or
/// gathered from the mirror) are the same bytes, shuffled or not, and match
/// float32 / 256 exactly.
#[tokio::test]
async fn uint8_mirror_serves_the_same_bytes_as_conversion() {
    use std::sync::atomic::Ordering;
    let srv = TestServer::start(sample()).await;
    let mut c = srv.client().await;
    let requests: Vec<BatchRequest> = [false, true]
        .into_iter()
        .map(|shuffle| {
            let mut r = BatchRequest::new("train", 3, 500);
            r.order.shuffle = shuffle;
            r.order.seed = 11;
            r.x_dtype = Some(DType::U8);
            r
        })
        .collect();
    let mut before = Vec::new();
    for r in &requests {
        before.push(c.get_batch(r).await.unwrap());
    }
    let mut ready = false;
    for _ in 0..500 {
        if srv.metrics.mirror_bytes.load(Ordering::Relaxed) > 0 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "the train set's uint8 mirror was built");
    assert_eq!(srv.metrics.mirror_bytes.load(Ordering::Relaxed), 3000 * 784);
    for (r, b) in requests.iter().zip(&before) {
        let after = c.get_batch(r).await.unwrap();
        assert_eq!(&after, b, "shuffle {}", r.order.shuffle);
        let mut f = r.clone();
        f.x_dtype = None;
        let floats = c.get_batch(&f).await.unwrap();
        let want: Vec<f32> = floats
            .x
            .data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let back: Vec<f32> = after.x.data.iter().map(|&v| v as f32 / 256.0).collect();
        assert_eq!(back, want);
    }
    // A whole epoch from the mirror, chunked small so chunk CRCs are folded
    // from row CRCs (the client checks every one).
    let mut r = requests[1].clone();
    r.max_chunk_bytes = Some(784 * 7);
    let n = c
        .stream_batches(&r)
        .await
        .unwrap()
        .fold(0, |n, b| {
            b.unwrap();
            n + 1
        })
        .await;
    assert_eq!(n, 3);
    assert!(srv
        .metrics
        .render()
        .contains(&format!("minibatchd_mirror_bytes {}", 3000 * 784)));
}
