"""Attach on a device, without a GPU: the daemon's emulated backend
(MINIBATCHD_DEVICE_BACKEND=emulated: host memory stands in for device
memory, its handles name a sealed memfd) behind the real attach exchange
and the real Python DeviceAttachment (minibatch_client/device.py). What
this covers: the DeviceCopy in the reply and its checks, tensors over the
"device" memory equal to the host attachment's bytes (batch slices, epoch
gathers, decode), verify(), the refusals (unknown device, no --device,
x_dtype), and lifetimes: the daemon keeps device memory through shutdown
while a process is attached, and a SIGKILLed trainer releases its hold.
What it cannot cover: CUDA IPC itself (scripts/gpu-check.sh on a GPU host).

Run: MINIBATCHD=target/debug/minibatchd python3 -m pytest tests/python/test_device.py
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client import attach as mca  # noqa: E402
from minibatch_client.device import DeviceAttachment  # noqa: E402
from test_attach import UdsDaemon  # noqa: E402

EMULATED = {"MINIBATCHD_DEVICE_BACKEND": "emulated"}
GPU0 = "GPU-656d756c-6174-6564-0000-000000000000"
GPU1 = "GPU-656d756c-6174-6564-0000-000000000001"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = UdsDaemon(tmp_path_factory.mktemp("device"), "--device", "cuda:0,cuda:1", env=EMULATED)
    yield d
    d.stop()


def test_info_lists_the_device_copies(daemon):
    with mc.Client(daemon.address) as c:
        info = c.info()
    assert [d.uuid for d in info.devices] == [GPU0, GPU1]
    assert all(d.backend == "emulated" and d.bytes > 15_000_000 for d in info.devices)


@pytest.mark.parametrize("uuid", [GPU0, GPU1.removeprefix("GPU-").upper()])
def test_device_tensors_equal_the_host_attachment(daemon, uuid):
    with mc.Client(daemon.target) as c, c.attach() as host, c.attach(device=uuid) as dev:
        assert isinstance(dev, DeviceAttachment)
        assert dev.backend == "emulated" and dev.device_uuid in (GPU0, GPU1)
        assert dev.fingerprint == host.fingerprint == c.info().fingerprint
        assert dev.verify()
        for set_, index, size in [("train", 0, 500), ("train", 5, 500), ("valid", 1, 600), ("test", 142, 7)]:
            hx, hy = host.batch(set_, index, size)
            dx, dy = dev.batch(set_, index, size)
            assert isinstance(dx, torch.Tensor) and dx.dtype == torch.float32 and dy.dtype == torch.int64
            assert np.array_equal(dx.numpy(), hx) and np.array_equal(dy.numpy(), hy), (set_, index)
        # A batch is a slice of the copy, not a copy.
        x_all, _ = dev.tensors("train")
        bx, _ = dev.batch("train", 2, 100)
        assert bx.data_ptr() == x_all.data_ptr() + 200 * 784 * 4
        order = dict(shuffle=True, seed=7, epoch=3, rank=1, world_size=3)
        for (hx, hy), (dx, dy) in zip(host.epoch("train", 128, **order), dev.epoch("train", 128, **order),
                                      strict=True):
            assert np.array_equal(dx.numpy(), hx) and np.array_equal(dy.numpy(), hy)
        assert dev.stats().minibatches > 0


def test_refusals_name_what_is_wrong(daemon, tmp_path):
    with pytest.raises(mc.NotFound, match=f"it is on {GPU0}"):
        mca.connect(daemon.target, device="GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(mc.FailedPrecondition, match="without x_dtypes"):
        mca.connect(daemon.target, device=GPU0, x_dtype="uint8")
    plain = UdsDaemon(tmp_path, name="plain.sock")
    try:
        with pytest.raises(mc.FailedPrecondition, match="serve --device"):
            mca.connect(plain.target, device=GPU0)
    finally:
        plain.stop()


def test_shutdown_waits_for_device_holders_and_a_killed_trainer_releases(tmp_path):
    d = UdsDaemon(tmp_path, "--device", "cuda:0", env=EMULATED, grace="30")
    try:
        a = mca.connect(d.target, device=GPU0)
        a.batch("train", 0, 10)
        # A trainer in another process, killed with SIGKILL later.
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT / "clients" / "python")!r})
            from minibatch_client import attach
            a = attach.connect({d.target!r}, device={GPU0!r})
            print("attached", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "attached"
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert d.proc.poll() is None, "the daemon must wait while processes hold its device memory"
        a.close()
        time.sleep(1.0)
        assert d.proc.poll() is None, "one holder left"
        child.kill()
        child.wait(10)
        d.proc.wait(15)
        assert d.proc.returncode == 0
    finally:
        d.stop()


def test_cuda_side_structures_without_a_gpu():
    """What the CUDA opener hands to ctypes and torch, checked where no GPU
    is: the IPC handle passed by value is 64 bytes, and the
    __cuda_array_interface__ describes the whole allocation as bytes."""
    import ctypes

    from minibatch_client import device

    h = device._IpcHandle.from_buffer_copy(bytes(range(64)))
    assert ctypes.sizeof(h) == 64
    assert bytes(memoryview(h)) == bytes(range(64))
    iface = device._CudaArray(0x7F0000001000, 4096).__cuda_array_interface__
    assert iface == {"shape": (4096,), "typestr": "|u1", "data": (0x7F0000001000, False), "version": 3,
                     "strides": None, "stream": None}
    # A UUID passes as is; "cuda:N" needs torch's CUDA (absent here): a clear error, not a hang.
    assert device.device_uuid(GPU0) == GPU0
    if not torch.cuda.is_available():
        with pytest.raises(mc.FailedPrecondition, match="sees no CUDA device"):
            device.device_uuid("cuda:0")


def test_gpu_check_script_dry_run(tmp_path):
    """scripts/gpu_check.py --emulated: the GPU host's check, run here
    without CUDA (its CUDA-only checks say skipped), so that the script a
    GPU session carries works before that session spends device time."""
    import json

    from test_client import binary

    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--binary", str(binary()),
                        "--out", str(out), "--emulated", "--examples", "20000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert all(c["ok"] for c in checks.values()), checks
    ran = {k for k, c in checks.items() if "skipped" not in c}
    assert ran == {"placed", "bytes", "batch_and_epoch", "torch_dataset", "sigterm"}, ran


def test_torch_dataset_reads_the_device_copy(daemon):
    """MinibatchDataset(device_attach=...): the rank's epoch from the
    daemon's device copy, the same minibatches as the host attachment's,
    with state_dict resume working as elsewhere."""
    from minibatch_client.torch import MinibatchDataset

    kw = dict(shuffle=True, seed=3, rank=1, world_size=2)
    host = MinibatchDataset(daemon.target, "train", 250, **kw)
    dev = MinibatchDataset(daemon.target, "train", 250, device_attach=GPU0, **kw)
    want = [(x.clone(), y.clone()) for x, y in host]
    got = list(dev)
    assert len(got) == len(want) == 6
    for (gx, gy), (wx, wy) in zip(got, want):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)
    # Interrupted after 2 minibatches, resumed by a new dataset: the rest.
    a = MinibatchDataset(daemon.target, "train", 250, device_attach=GPU0, **kw)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    b = MinibatchDataset(daemon.target, "train", 250, device_attach=GPU0, **kw)
    b.load_state_dict(state)
    rest = list(b)
    assert len(rest) == 4 and all(torch.equal(r[0], w[0]) for r, w in zip(rest, want[2:]))
    with pytest.raises(ValueError, match="unix:///PATH"):
        MinibatchDataset(daemon.address, "train", 250, device_attach=GPU0)
