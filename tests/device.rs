//! The device tier without a GPU: `--device` fails cleanly where there is
//! no CUDA driver (this project's CI), and with the emulated backend (host
//! memory standing in for a device) the daemon places every dataset on
//! every device and reports it in GetInfo and the metrics. The attach side
//! (opening the handles, lifetimes) is tested from Python
//! (tests/python/test_device.py); the real backend runs on a GPU host
//! (scripts/gpu-check.sh).
mod common;

use std::process::Command;

use common::*;
use minibatchd::client::Client;

/// Whether this host has a CUDA driver library (then the no-driver test
/// cannot run: it says so).
fn driver_present() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/lib/libcuda.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--metrics-addr", "off"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn device_flags_fail_cleanly_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let sock = sock.to_str().unwrap();
    for (args, why) in [
        (vec!["--device", "cuda:0"], "give --uds PATH too"),
        (vec!["--device", "gpu0", "--uds", sock], "not a CUDA device"),
        (
            vec!["--device", "cuda:0,cuda:0", "--uds", sock],
            "names cuda:0 twice",
        ),
    ] {
        let err = serve_fails(&args, &[]);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    if driver_present() {
        eprintln!("a CUDA driver is installed here: the no-driver start-up error is not tested");
        return;
    }
    let err = serve_fails(&["--device", "cuda:0", "--uds", sock], &[]);
    assert!(
        err.contains("--device cuda:0: the CUDA driver library (libcuda.so.1) is not installed"),
        "{err}"
    );
    assert!(!std::path::Path::new(sock).exists(), "nothing served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_devices_hold_every_dataset_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let a = dir.path().join("a.pkl.gz");
    std::fs::write(&a, minibatchd::BUNDLED_SAMPLE).unwrap();
    let data_b = format!("b={}", a.display());
    let d = Daemon::start_with(
        &[
            "--uds",
            sock.to_str().unwrap(),
            "--device",
            "cuda:0,cuda:1",
            "--data",
            a.to_str().unwrap(),
            "--data",
            &data_b,
        ],
        |c| {
            c.env("MINIBATCHD_DEVICE_BACKEND", "emulated");
        },
    );
    d.wait_for_log(&["dataset resident on the device"], START_UP_TIMEOUT);
    let mut c = Client::connect(&d.addr).await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(info.datasets.len(), 2);
    for ds in &info.datasets {
        assert_eq!(ds.devices.len(), 2, "{}", ds.name);
        let uuids: Vec<_> = ds.devices.iter().map(|d| d.uuid.as_str()).collect();
        assert_eq!(
            uuids,
            [
                "GPU-656d756c-6174-6564-0000-000000000000",
                "GPU-656d756c-6174-6564-0000-000000000001"
            ]
        );
        for dev in &ds.devices {
            assert_eq!(dev.backend, "emulated");
            // The host buffers, byte for byte (tensors and the framing
            // between them), once per device.
            assert!(
                dev.bytes >= 15_720_000 && dev.bytes <= ds.memory_bytes,
                "{} on {}: {} bytes of {}",
                ds.name,
                dev.uuid,
                dev.bytes,
                ds.memory_bytes
            );
        }
    }
    let log = d.log_text();
    assert_eq!(
        log.matches("dataset resident on the device").count(),
        4,
        "{log}"
    );
}
