//! The device tier: each dataset copied once into the memory of each GPU
//! named by `serve --device cuda:0[,cuda:1...]`, and exported by CUDA IPC
//! so that trainers on this host attach to it ([`crate::attach`]): a
//! minibatch is then a slice of device memory, as in the tutorial's
//! shared variables, with no host work per step.
//!
//! Layout: one plain device allocation per host buffer of the dataset
//! (`Dataset::memory`), holding the same bytes at the same offsets, so an
//! attach reply's regions (file, offset, length) describe the device copy
//! as they describe the host one. Plain allocations (`cuMemAlloc`), never
//! stream-ordered pool ones: `cuIpcGetMemHandle` refuses those.
//!
//! Backends: [`cuda`] is the real one and the default (the CUDA driver
//! loaded at run time, so one binary serves every host, and without
//! `--device` nothing CUDA is touched). [`emulated`] stands in for a device
//! in tests on machines without a GPU (`MINIBATCHD_DEVICE_BACKEND=emulated`):
//! "device memory" is a sealed memfd and its "IPC handle" names it.
//!
//! Lifetimes: the copies live as long as the [`Catalog`](crate::catalog)
//! that holds them; the server keeps them through shutdown until every
//! process attached to them has gone (or the grace period ends), because
//! CUDA IPC importers read the daemon's own allocations.
pub mod cuda;
pub mod emulated;

use std::sync::Arc;

use crate::catalog::Datasets;

/// Most devices one daemon copies its datasets to (a host has 8, rarely 16).
pub const MAX_DEVICES: usize = 16;

/// Why the device tier could not be set up; start-up stops on any of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Spec(String),
    #[error("--device {spec}: {why}")]
    Unavailable { spec: String, why: String },
    #[error("{device}: {call} failed: {why}")]
    Call {
        device: String,
        call: &'static str,
        why: String,
    },
}

/// Parses `--device`: `cuda:N` ordinals, comma-separated, no duplicates.
pub fn parse_spec(spec: &str) -> Result<Vec<u32>, DeviceError> {
    let mut out: Vec<u32> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = part
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| {
                DeviceError::Spec(format!(
                    "--device {spec:?}: {part:?} is not a CUDA device; write cuda:0, or cuda:0,cuda:1"
                ))
            })?;
        if out.contains(&n) {
            return Err(DeviceError::Spec(format!(
                "--device {spec:?} names cuda:{n} twice"
            )));
        }
        out.push(n);
    }
    if out.len() > MAX_DEVICES {
        return Err(DeviceError::Spec(format!(
            "--device {spec:?} names {} devices; at most {MAX_DEVICES}",
            out.len()
        )));
    }
    Ok(out)
}

/// One device as a backend opened it.
pub trait Device: Send + Sync {
    /// Stable identity: `GPU-` and the UUID, as `nvidia-smi -L` prints it
    /// (ordinals change with CUDA_VISIBLE_DEVICES; UUIDs do not).
    fn uuid(&self) -> &str;
    fn name(&self) -> &str;
    /// Registers `host` as page-locked memory for this device's copies
    /// (pinned in CUDA's sense, so they run at DMA speed).
    fn register_host(&self, host: &[u8]) -> Result<(), DeviceError>;
    /// A new allocation holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn Allocation>, DeviceError>;
}

/// Device memory holding a copy, freed when dropped.
pub trait Allocation: Send + Sync {
    /// The IPC handle another process opens it with (64 bytes for CUDA).
    fn ipc_handle(&self) -> Vec<u8>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A way to reach devices.
pub trait Backend {
    /// "cuda" or "emulated": what an attaching client opens handles with.
    fn kind(&self) -> &'static str;
    /// Opens device `ordinal` (`spec` names the flag's value in errors).
    fn open(&self, ordinal: u32, spec: &str) -> Result<Box<dyn Device>, DeviceError>;
}

/// The backend `--device` uses: CUDA, unless the environment asks for the
/// emulated one (tests without a GPU).
pub fn backend() -> Box<dyn Backend> {
    match std::env::var("MINIBATCHD_DEVICE_BACKEND").as_deref() {
        Ok("emulated") => Box::new(emulated::Emulated),
        _ => Box::new(cuda::Cuda),
    }
}

/// One dataset's copy on one device.
pub struct Copy {
    pub device: Arc<dyn Device>,
    pub backend: &'static str,
    /// One per host buffer of the dataset, same order, same offsets.
    pub allocations: Vec<Box<dyn Allocation>>,
}

impl Copy {
    /// Device bytes this copy holds.
    pub fn bytes(&self) -> usize {
        self.allocations.iter().map(|a| a.len()).sum()
    }
}

/// Copies every dataset to every device of `ordinals` (in `--device`
/// order): per dataset, the copies in that order. Runs on the calling
/// thread, which a CUDA context then belongs to: call it off the async
/// runtime.
pub fn place(
    datasets: &Datasets,
    ordinals: &[u32],
    spec: &str,
    backend: &dyn Backend,
) -> Result<Vec<Vec<Copy>>, DeviceError> {
    let mut devices: Vec<Arc<dyn Device>> = Vec::new();
    for &n in ordinals {
        let d: Arc<dyn Device> = Arc::from(backend.open(n, spec)?);
        if devices.iter().any(|o| o.uuid() == d.uuid()) {
            return Err(DeviceError::Spec(format!(
                "--device {spec:?}: cuda:{n} is {}, named already",
                d.uuid()
            )));
        }
        devices.push(d);
    }
    let mut out = Vec::new();
    for (name, ds) in datasets.iter() {
        let mut copies = Vec::new();
        for d in &devices {
            let t0 = std::time::Instant::now();
            let mut allocations = Vec::new();
            for m in &ds.memory {
                // Pageable memory copies too, only slower: not worth
                // refusing to start over (it fails under a small memlock
                // limit, as mlock does).
                if let Err(e) = d.register_host(m.bytes()) {
                    tracing::warn!(error = %e, "host memory not registered with CUDA: copies run from pageable memory");
                }
                allocations.push(d.upload(m.bytes())?);
            }
            let copy = Copy {
                device: d.clone(),
                backend: backend.kind(),
                allocations,
            };
            tracing::info!(
                dataset = %name,
                device = d.uuid(),
                name = d.name(),
                backend = backend.kind(),
                bytes = copy.bytes(),
                ms = t0.elapsed().as_millis() as u64,
                "dataset resident on the device"
            );
            copies.push(copy);
        }
        out.push(copies);
    }
    Ok(out)
}

/// Whether `asked` (a UUID with or without `GPU-`, any case) names `uuid`.
pub fn same_device(uuid: &str, asked: &str) -> bool {
    let strip = |s: &str| {
        let s = s.trim();
        s.strip_prefix("GPU-")
            .or_else(|| s.strip_prefix("gpu-"))
            .unwrap_or(s)
            .to_ascii_lowercase()
    };
    !asked.trim().is_empty() && strip(uuid) == strip(asked)
}

/// `GPU-` and the 16 bytes of a device UUID in the 8-4-4-4-12 hex form.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("cuda:0").unwrap(), vec![0]);
        assert_eq!(parse_spec("cuda:1, cuda:0").unwrap(), vec![1, 0]);
        for (bad, why) in [
            ("gpu0", "not a CUDA device"),
            ("cuda:x", "not a CUDA device"),
            ("cuda:0,cuda:0", "twice"),
            ("0", "not a CUDA device"),
        ] {
            let e = parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("cuda:{i}")).collect();
        assert!(parse_spec(&many.join(","))
            .unwrap_err()
            .to_string()
            .contains("at most 16"));
    }

    #[test]
    fn uuids() {
        let b: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        let u = format_uuid(&b);
        assert_eq!(u, "GPU-00112233-4455-6677-8899-aabbccddeeff");
        assert!(same_device(&u, "GPU-00112233-4455-6677-8899-AABBCCDDEEFF"));
        assert!(same_device(&u, "00112233-4455-6677-8899-aabbccddeeff"));
        assert!(!same_device(&u, ""));
        assert!(!same_device(&u, "GPU-00112233"));
    }
}
