//! A stand-in for a GPU on machines without one (tests, CI): "device
//! memory" is a sealed memfd holding the copy, and its "IPC handle" says
//! where another process of the same user opens it
//! (`/proc/<daemon pid>/fd/<fd>`), as a CUDA IPC handle says which
//! allocation to map. It exercises everything around the device tier (the
//! placement, the attach exchange, lifetimes, the Python opener) but no
//! CUDA; selected by `MINIBATCHD_DEVICE_BACKEND=emulated`, never by default.
use std::os::fd::AsRawFd;

use super::{Allocation, Backend, Device, DeviceError};
use crate::memory::{Backing, HostBuffer, Resident};

/// First bytes of an emulated handle; then the daemon's pid and the
/// descriptor (little-endian u32 each), zero-padded to 64 bytes like a
/// CUDA IPC handle.
pub const HANDLE_MAGIC: &[u8; 8] = b"MBEMUL01";

/// The emulated backend.
pub struct Emulated;

struct EmulatedDevice {
    uuid: String,
    name: String,
}

impl Backend for Emulated {
    fn kind(&self) -> &'static str {
        "emulated"
    }

    fn open(&self, ordinal: u32, _spec: &str) -> Result<Box<dyn Device>, DeviceError> {
        // A fixed, recognisable UUID per ordinal.
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"emulated");
        b[12..].copy_from_slice(&ordinal.to_be_bytes());
        Ok(Box::new(EmulatedDevice {
            uuid: super::format_uuid(&b),
            name: format!("emulated device {ordinal} (host memory)"),
        }))
    }
}

impl Device for EmulatedDevice {
    fn uuid(&self) -> &str {
        &self.uuid
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn register_host(&self, _host: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }

    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn Allocation>, DeviceError> {
        let fail = |e: std::io::Error| DeviceError::Call {
            device: self.uuid.clone(),
            call: "memfd copy",
            why: e.to_string(),
        };
        let mem = HostBuffer::from_slice(bytes, Backing::Shared)
            .and_then(HostBuffer::freeze)
            .map_err(fail)?;
        if mem.fd().is_none() {
            return Err(fail(std::io::Error::other(
                "memfd_create is refused here: the emulated device needs it",
            )));
        }
        Ok(Box::new(EmulatedAllocation {
            len: bytes.len(),
            mem,
        }))
    }
}

struct EmulatedAllocation {
    mem: Resident,
    len: usize,
}

impl Allocation for EmulatedAllocation {
    fn ipc_handle(&self) -> Vec<u8> {
        let fd = self.mem.fd().expect("checked at upload").as_raw_fd();
        let mut h = HANDLE_MAGIC.to_vec();
        h.extend_from_slice(&std::process::id().to_le_bytes());
        h.extend_from_slice(&(fd as u32).to_le_bytes());
        h.resize(64, 0);
        h
    }

    fn len(&self) -> usize {
        self.len
    }
}
