//! The real device backend: the CUDA driver API, loaded at run time
//! (cudarc's `dynamic-loading`), so the binary needs no CUDA toolkit to
//! build and starts on hosts without a driver; only `--device` touches it.
//!
//! Not run on a GPU in this project's CI (it has none): `scripts/gpu-check.sh`
//! runs it on a GPU host. What CI does check: without the driver,
//! `--device` fails at start-up with the message of [`Cuda::open`].
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::sys;

use super::{format_uuid, Allocation, Backend, Device, DeviceError};

/// The CUDA driver backend.
pub struct Cuda;

/// A driver call's result as text ("CUDA_ERROR_OUT_OF_MEMORY: out of memory").
fn describe(r: sys::CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: both calls only write a pointer to a static string.
    unsafe {
        sys::cuGetErrorName(r, &mut name);
        sys::cuGetErrorString(r, &mut text);
    }
    let s = |p: *const std::ffi::c_char| {
        if p.is_null() {
            None
        } else {
            // SAFETY: the driver returns NUL-terminated static strings.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        }
    };
    match (s(name), s(text)) {
        (Some(n), Some(t)) => format!("{n}: {t}"),
        _ => format!("{r:?}"),
    }
}

/// Runs a driver call, turning a failure (or a panic of the loader, which
/// cudarc raises for a symbol the installed driver lacks) into an error.
fn call(
    device: &str,
    name: &'static str,
    f: impl FnOnce() -> sys::CUresult,
) -> Result<(), DeviceError> {
    let err = |why: String| DeviceError::Call {
        device: device.into(),
        call: name,
        why,
    };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(sys::CUresult::CUDA_SUCCESS) => Ok(()),
        Ok(r) => Err(err(describe(r))),
        Err(p) => Err(err(format!(
            "the driver library lacks it ({})",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("panic")
        ))),
    }
}

/// An opened device: its primary context, retained.
struct CudaDevice {
    label: String,
    uuid: String,
    name: String,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext handle may be used from any thread once made current
// there (every method below makes it current first).
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl Backend for Cuda {
    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn open(&self, ordinal: u32, spec: &str) -> Result<Box<dyn Device>, DeviceError> {
        // SAFETY: only probes whether the library can be loaded.
        let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(DeviceError::Unavailable {
                spec: spec.into(),
                why: "the CUDA driver library (libcuda.so.1) is not installed on this host or not \
                      visible in this container (for Docker: the NVIDIA container toolkit and \
                      --gpus; a fully static binary cannot load it); serve without --device"
                    .into(),
            });
        }
        let label = format!("cuda:{ordinal}");
        // The flag's value in every error, as for a missing driver.
        let within = |e: DeviceError| DeviceError::Unavailable {
            spec: spec.into(),
            why: e.to_string(),
        };
        // SAFETY: plain driver calls with out-pointers to locals.
        call(&label, "cuInit", || unsafe { sys::cuInit(0) }).map_err(within)?;
        let mut count = 0;
        call(&label, "cuDeviceGetCount", || unsafe {
            sys::cuDeviceGetCount(&mut count)
        })
        .map_err(within)?;
        if ordinal as i32 >= count {
            return Err(DeviceError::Unavailable {
                spec: spec.into(),
                why: match count {
                    0 => "no CUDA device is visible here (CUDA_VISIBLE_DEVICES?)".into(),
                    n => format!(
                        "this host has {n} CUDA device(s) visible (cuda:0 to cuda:{}); \
                         CUDA_VISIBLE_DEVICES renumbers them",
                        n - 1
                    ),
                },
            });
        }
        let mut dev = 0;
        call(&label, "cuDeviceGet", || unsafe {
            sys::cuDeviceGet(&mut dev, ordinal as i32)
        })
        .map_err(within)?;
        let mut raw = [0 as std::ffi::c_char; 256];
        call(&label, "cuDeviceGetName", || unsafe {
            sys::cuDeviceGetName(raw.as_mut_ptr(), raw.len() as i32, dev)
        })
        .map_err(within)?;
        // SAFETY: the driver wrote a NUL-terminated name into `raw`.
        let name = unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut uuid = sys::CUuuid_st { bytes: [0; 16] };
        call(&label, "cuDeviceGetUuid_v2", || unsafe {
            sys::cuDeviceGetUuid_v2(&mut uuid, dev)
        })
        .map_err(within)?;
        let uuid = format_uuid(&uuid.bytes.map(|b| b as u8));
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        call(&label, "cuDevicePrimaryCtxRetain", || unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })
        .map_err(within)?;
        Ok(Box::new(CudaDevice {
            label: format!("{label} ({uuid})"),
            uuid,
            name,
            ctx,
        }))
    }
}

impl CudaDevice {
    fn current(&self) -> Result<(), DeviceError> {
        // SAFETY: a retained primary context.
        call(&self.label, "cuCtxSetCurrent", || unsafe {
            sys::cuCtxSetCurrent(self.ctx)
        })
    }
}

impl Device for CudaDevice {
    fn uuid(&self) -> &str {
        &self.uuid
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn register_host(&self, host: &[u8]) -> Result<(), DeviceError> {
        self.current()?;
        // The mapping is page-aligned and extends to its last page's end.
        let page = 4096;
        let len = host.len().div_ceil(page) * page;
        // PORTABLE: one registration serves every device's context;
        // READ_ONLY: the daemon's mapping is read-only (sealed).
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_READ_ONLY;
        let r = catch_unwind(|| unsafe {
            // SAFETY: `host` is mapped for at least `len` bytes (page rounded).
            sys::cuMemHostRegister_v2(host.as_ptr() as *mut _, len, flags)
        });
        match r {
            Ok(sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED) => Ok(()),
            Ok(r) => call(&self.label, "cuMemHostRegister_v2", || r),
            Err(_) => call(&self.label, "cuMemHostRegister_v2", || {
                sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
            }),
        }
    }

    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn Allocation>, DeviceError> {
        self.current()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // A plain allocation: IPC handles cannot export pool memory.
        call(&self.label, "cuMemAlloc_v2", || unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes.len().max(1))
        })?;
        // Owned from here: freed on the error paths below.
        let mut alloc = CudaAllocation {
            label: self.label.clone(),
            ctx: self.ctx,
            ptr,
            len: bytes.len(),
            handle: Vec::new(),
        };
        call(&self.label, "cuMemcpyHtoD_v2", || unsafe {
            sys::cuMemcpyHtoD_v2(ptr, bytes.as_ptr().cast(), bytes.len())
        })?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        call(&self.label, "cuIpcGetMemHandle", || unsafe {
            sys::cuIpcGetMemHandle(&mut h, ptr)
        })?;
        alloc.handle = h.reserved.iter().map(|&b| b as u8).collect();
        Ok(Box::new(alloc))
    }
}

struct CudaAllocation {
    label: String,
    ctx: sys::CUcontext,
    ptr: sys::CUdeviceptr,
    len: usize,
    handle: Vec<u8>,
}

// SAFETY: see CudaDevice.
unsafe impl Send for CudaAllocation {}
unsafe impl Sync for CudaAllocation {}

impl Allocation for CudaAllocation {
    fn ipc_handle(&self) -> Vec<u8> {
        self.handle.clone()
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for CudaAllocation {
    fn drop(&mut self) {
        // SAFETY: the allocation of a retained context, freed once.
        let r = call(&self.label, "cuMemFree_v2", || unsafe {
            match sys::cuCtxSetCurrent(self.ctx) {
                sys::CUresult::CUDA_SUCCESS => sys::cuMemFree_v2(self.ptr),
                r => r,
            }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "freeing device memory failed");
        }
    }
}
