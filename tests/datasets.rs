//! Several named datasets in one daemon: GetInfo lists them, requests name
//! one (or none, when there is only one), each serves its own bytes, over
//! gRPC, attach and the command line; bad names and bad files stop
//! start-up with a message naming them.
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use minibatchd::attach::client::AttachOptions;
use minibatchd::catalog::Datasets;
use minibatchd::client::{BatchRequest, Client};
use minibatchd::server::{ServerOptions, UdsOptions};
use minibatchd::store::Dataset;
use tokio_stream::StreamExt;

fn two() -> Datasets {
    Datasets::new(vec![
        ("mnist".into(), Arc::new(sample())),
        ("synth".into(), Arc::new(synthetic())),
    ])
    .unwrap()
}

fn rows(ds: &Dataset, set: &str, start: usize, end: usize) -> (Vec<u8>, Vec<u8>) {
    let s = ds.set(set).unwrap();
    (s.x.rows(start, end).to_vec(), s.y.rows(start, end).to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_datasets_served_side_by_side() {
    let (mnist, synth) = (sample(), synthetic());
    let s = TestServer::start_datasets(two(), ServerOptions::default()).await;
    let mut c = s.client().await;

    // GetInfo without a name: the list, and no guess at which one.
    let info = c.info().await.unwrap();
    let names: Vec<_> = info.datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["mnist", "synth"]);
    assert!(info.name.is_empty() && info.sets.is_empty() && info.fingerprint.is_empty());
    assert!(info.limits.is_some() && !info.server_version.is_empty());
    for (d, ds) in info.datasets.iter().zip([&mnist, &synth]) {
        let sets: Vec<_> = d
            .sets
            .iter()
            .map(|s| (s.name.as_str(), s.examples))
            .collect();
        let want: Vec<_> = ds
            .sets
            .iter()
            .map(|s| (s.name.as_str(), s.examples() as u64))
            .collect();
        assert_eq!(sets, want, "{}", d.name);
        assert_eq!(d.fingerprint.len(), 64);
        assert_eq!(d.memory_bytes, ds.memory_bytes as u64);
    }
    assert_ne!(info.datasets[0].fingerprint, info.datasets[1].fingerprint);
    // Named: the top-level fields describe it (and the list stays).
    let synth_info = c.info_of("synth").await.unwrap();
    assert_eq!(synth_info.name, "synth");
    assert_eq!(synth_info.fingerprint, info.datasets[1].fingerprint);
    assert_eq!(synth_info.datasets.len(), 2);
    // The same fingerprint as the dataset served alone.
    let alone = TestServer::start(synthetic()).await;
    let alone_info = alone.client().await.info().await.unwrap();
    assert_eq!(alone_info.fingerprint, synth_info.fingerprint);
    assert_eq!(alone_info.name, "synthetic");

    // Each dataset serves its own bytes, GetBatch and StreamBatches.
    for (name, ds, set, index, size) in [
        ("mnist", &mnist, "train", 1u64, 100usize),
        ("synth", &synth, "train", 3, 1000),
        ("synth", &synth, "valid", 0, 7),
    ] {
        let mut r = BatchRequest::new(set, index, size as u32);
        r.dataset = name.into();
        let b = c.get_batch(&r).await.unwrap();
        let (x, y) = rows(ds, set, index as usize * size, (index as usize + 1) * size);
        assert_eq!((&b.x.data[..], &b.y.data[..]), (&x[..], &y[..]), "{name}");
    }
    let mut r = BatchRequest::new("valid", 0, 300);
    r.dataset = "synth".into();
    let got: Vec<_> = c
        .stream_batches(&r)
        .await
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    let x: Vec<u8> = got.iter().flat_map(|b| b.x.data.to_vec()).collect();
    assert_eq!(x, rows(&synth, "valid", 0, 1000).0);

    // No name with several: INVALID_ARGUMENT listing them; unknown: NOT_FOUND.
    for (dataset, want) in [
        ("", tonic::Code::InvalidArgument),
        ("nope", tonic::Code::NotFound),
        ("MNIST", tonic::Code::NotFound),
    ] {
        let mut r = BatchRequest::new("train", 0, 10);
        r.dataset = dataset.into();
        let e = c.get_batch(&r).await.unwrap_err();
        let msg = e.to_string();
        assert_eq!(code(e), want, "{dataset:?}");
        assert!(msg.contains("\"mnist\", \"synth\""), "{dataset:?}: {msg}");
        let e = c.info_of(dataset).await;
        if dataset.is_empty() {
            assert!(e.is_ok(), "GetInfo without a name lists them");
        } else {
            assert_eq!(code(e.unwrap_err()), tonic::Code::NotFound);
        }
    }
    // A hostile name is echoed bounded.
    let mut r = BatchRequest::new("train", 0, 10);
    r.dataset = "n".repeat(100_000);
    let msg = c.get_batch(&r).await.unwrap_err().to_string();
    assert!(msg.len() < 1_000, "{} bytes", msg.len());

    // Metrics carry the dataset.
    let text = s.metrics.render();
    for line in [
        "minibatchd_minibatches_total{method=\"GetBatch\",dataset=\"mnist\"} 1",
        "minibatchd_minibatches_total{method=\"GetBatch\",dataset=\"synth\"} 2",
        "minibatchd_minibatches_total{method=\"StreamBatches\",dataset=\"synth\"} 4",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
    assert!(text.contains(&format!(
        "minibatchd_dataset_bytes{{dataset=\"synth\"}} {}",
        synth.memory_bytes
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dataset_answers_with_or_without_its_name() {
    let s = TestServer::start(sample()).await;
    let mut c = s.client().await;
    let info = c.info().await.unwrap();
    assert_eq!(info.name, "mnist-sample");
    assert_eq!(info.datasets.len(), 1);
    assert_eq!(info.datasets[0].fingerprint, info.fingerprint);
    assert_eq!(info.datasets[0].sets, info.sets);
    for name in ["", "mnist-sample"] {
        let mut r = BatchRequest::new("test", 2, 10);
        r.dataset = name.into();
        let b = c.get_batch(&r).await.unwrap();
        assert_eq!(&b.x.data[..], &rows(&s.dataset, "test", 20, 30).0[..]);
    }
    let mut r = BatchRequest::new("test", 2, 10);
    r.dataset = "other".into();
    let e = c.get_batch(&r).await.unwrap_err();
    assert!(e.to_string().contains("\"mnist-sample\""), "{e}");
    assert_eq!(code(e), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_names_its_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    // The sample twice (loaded into memfds, so both attach), and a dataset
    // built in memory that cannot be shared.
    let named = Datasets::new(vec![
        ("a".into(), Arc::new(sample())),
        ("b".into(), Arc::new(sample())),
        ("mem".into(), Arc::new(synthetic())),
    ])
    .unwrap();
    let opts = ServerOptions {
        uds: Some(UdsOptions::new(&path)),
        io_threads: 2,
        ..Default::default()
    };
    let s = TestServer::start_datasets(named, opts).await;
    let mut c = s.client().await;
    let info = c.info_of("b").await.unwrap();
    let attach = |dataset: &str| {
        let o = AttachOptions {
            dataset: dataset.into(),
            ..Default::default()
        };
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            loop {
                match Client::attach(&p, &o) {
                    Err(minibatchd::attach::client::AttachError::Io { .. })
                        if t0.elapsed() < START_UP_TIMEOUT =>
                    {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    r => return r,
                }
            }
        })
    };
    let a = attach("b").await.unwrap().unwrap();
    assert_eq!(a.dataset, "b");
    assert_eq!(a.fingerprint, info.fingerprint);
    a.verify().unwrap();
    let (x, _) = a.batch("train", 2, 100).unwrap();
    assert_eq!(x.data, &rows(&s.dataset, "train", 200, 300).0[..]);
    for (dataset, want) in [
        ("", tonic::Code::InvalidArgument),
        ("zzz", tonic::Code::NotFound),
        ("mem", tonic::Code::FailedPrecondition),
    ] {
        match attach(dataset).await.unwrap() {
            Err(minibatchd::attach::client::AttachError::Refused(st)) => {
                assert_eq!(st.code(), want, "{dataset:?}: {}", st.message())
            }
            Err(e) => panic!("{dataset:?}: {e}"),
            Ok(_) => panic!("{dataset:?} attached"),
        }
    }
}

/// Writes the bundled sample to `dir/name` and returns its path.
fn sample_file(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, minibatchd::BUNDLED_SAMPLE).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn the_binary_serves_several_and_refuses_bad_names_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = sample_file(dir.path(), "mnist.pkl.gz");
    let b = sample_file(dir.path(), "other.pkl.gz");
    let d = Daemon::start(&["--data", &a, "--data", &format!("digits={b}")]);
    let out = run(&["info", "--server", &d.addr]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dataset mnist: source mnist.pkl.gz"),
        "{text}"
    );
    assert!(
        text.contains("dataset digits: source other.pkl.gz"),
        "{text}"
    );
    let out = run(&["info", "--server", &d.addr, "--dataset", "digits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dataset digits") && !text.contains("dataset mnist"),
        "{text}"
    );
    // get without --dataset is refused with the names; with one it works.
    let out = run(&["get", "--server", &d.addr, "--size", "10"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"mnist\", \"digits\""), "{err}");
    let out = run(&[
        "get",
        "--server",
        &d.addr,
        "--dataset",
        "digits",
        "--size",
        "10",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);

    // Start-up refusals: each names what is wrong, and nothing serves.
    let bad = dir.path().join("bad.pkl");
    std::fs::write(&bad, b"\x80\x02cos\nsystem\n").unwrap();
    let bad = bad.to_str().unwrap().to_string();
    for (args, why) in [
        (
            vec!["--data", &a, "--data", &a],
            "two datasets are named \"mnist\"",
        ),
        (vec!["--data", "my data=/x.npz"], "not valid"),
        (vec!["--data", &a, "--data", &bad], "dataset \"bad\""),
        (
            vec!["--data", &a, "--data", "gone=/nonexistent/file.npz"],
            "/nonexistent/file.npz",
        ),
        // Each sample holds ~15.7 MB: one fits 20 MB, two do not.
        (
            vec![
                "--data",
                &a,
                "--data",
                &format!("b={b}"),
                "--max-dataset-bytes",
                "20000000",
            ],
            "together, more than --max-dataset-bytes 20000000",
        ),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--metrics-addr", "off"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
}
