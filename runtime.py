"""The few tinygrad runtime internals the project relies on, in one place; importing it sets the process-wide
settings they need, so it comes before numpy and tinygrad wherever the agent is used.

- OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS threads busy-wait for work and contend with tinygrad's runtime thread for
  the cores; the small products of the k-NN searches ran far slower threaded (64 x 16 times 16 x 1000: 49 ms against
  0.07 ms on the 2-core machine while busy). Read once, when numpy is first imported.
- HCQ2=1: tinygrad runs a compiled graph as one native call instead of one Python call per kernel (CartPole: 4.0
  instead of 4.9 ms per step), and each CPU device gets a worker thread of its own, on which the update's ranking is
  split between the cores (`ranking_devices`). Read once, when tinygrad is first imported; HCQ2=0 turns it off.
- PARALLEL=0: no pool of compile worker processes. `timeout` and a terminal's job control signal the whole process
  group, and a worker killed by SIGTERM while waiting for work dies holding the pool's task-queue lock, so
  multiprocessing's exit handler waits for that lock forever. Compiling in-process is no slower here (Pendulum,
  2 episodes: 17-20 s with PARALLEL=0 against 24-29 s with PARALLEL=2 on 2 cores).

Each is a default: a value already in the environment wins.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

SETTINGS = {"OPENBLAS_NUM_THREADS": "1", "HCQ2": "1", "PARALLEL": "0"}
_late = [name for name, module in (("OPENBLAS_NUM_THREADS", "numpy"), ("HCQ2", "tinygrad")) if module in sys.modules
         and name not in os.environ]
for _name, _value in SETTINGS.items():
    os.environ.setdefault(_name, _value)
if _late:  # the agent still works, only slower
    warnings.warn(f"{' and '.join(_late)} set after numpy or tinygrad was imported: import wolpertinger first for "
                  "full speed", stacklevel=2)

import numpy as np  # noqa: E402
from tinygrad import Device, Tensor, dtypes  # noqa: E402
from tinygrad.dtype import DType, _from_np_dtype, _to_np_dtype  # noqa: E402
from tinygrad.helpers import getenv  # noqa: E402

from util import usable_cores  # noqa: E402


def tinygrad_dtype(dtype: np.dtype) -> DType:
    """tinygrad's dtype for a numpy dtype."""
    return _from_np_dtype(np.dtype(dtype))


def use_device(name: str | None, beam: int = 0) -> None:
    """Make `name` (e.g. CPU, CUDA; None: tinygrad's choice) the default device and `beam` the BEAM search width of
    the kernels compiled from now on; ValueError for a device that is not available."""
    from tinygrad.helpers import BEAM, DEV
    if name:
        try:
            Device[name.upper()]
        except Exception as e:
            raise ValueError(f"tinygrad device {name!r} is not available ({type(e).__name__})") from None
        DEV.value = name.upper()  # tinygrad 0.14 reads the default device from DEV
    if beam:
        BEAM.value = beam


def ranking_devices() -> list[str]:
    """The devices between which the update splits the ranking of its minibatch's candidates. Under HCQ2 each CPU
    device runs its kernels in a worker thread of its own, so graphs queued on CPU devices of their own run side by
    side: one device per core this process may use, at most $WOLPERTINGER_CORES. Without HCQ2, or on another
    backend, the one default device."""
    if Device.DEFAULT != "CPU" or not getenv("HCQ2"):
        return [Device.DEFAULT]
    return ["CPU"] + [f"CPU:{i}" for i in range(1, usable_cores())]


def realized_zeros(*shape: int, dtype=dtypes.float32, device: str | None = None) -> Tensor:
    """A realised buffer (float32 and on the default device unless told) to write host data into (see `write`)."""
    return Tensor.zeros(*shape, dtype=dtype, device=device).contiguous().realize()


def write(buffer: Tensor, array: np.ndarray) -> None:
    """Copy a numpy array, converted to the buffer's dtype, into a realised tensor's memory in place (no new
    Tensor, no graph)."""
    buf = buffer.uop.buffer.ensure_allocated()
    buf.allocator._copyin(buf._buf, memoryview(np.ascontiguousarray(array, _to_np_dtype(buffer.dtype))).cast("B"))


def sleep_until_idle(devices: list[str]) -> None:
    """Sleep until the worker threads of these tinygrad CPU devices (and of the CPU device that submits their work)
    have run every queued command. tinygrad's own wait spins in Python, holding a core and the GIL, which leaves
    graphs queued on two CPU devices of a 2-core machine one core between them. Sleeps grow with the time waited
    (a tenth of it), so that waking costs little of either core and adds at most a tenth to the wait. Only a wait
    in advance: a `read` still synchronises, so an early return costs time, never correctness. Two passes in a
    row find every worker idle, as a submitting worker passes commands on to the others."""
    workers = [tuple(getattr(worker, name)._buf.cpu_view().view(fmt="Q") for name in ("put", "done"))
               for device in dict.fromkeys(["CPU", *devices]) for worker in getattr(Device[device], "workers", ())]
    start, idle_passes = time.perf_counter(), 0
    while idle_passes < 2:
        if all(done[0] >= put[0] for put, done in workers):
            idle_passes += 1
        else:
            idle_passes = 0
            time.sleep(max(2e-5, (time.perf_counter() - start) / 10))


def read(tensor: Tensor) -> np.ndarray:
    """A realised tensor's values as a numpy array (cheaper than Tensor.numpy per call)."""
    buf = tensor.uop.buffer.ensure_allocated()
    out = np.empty(tensor.shape, _to_np_dtype(tensor.dtype))
    allocator = buf.base.allocator  # a view of a buffer (an output cut from a larger one) copies through its base
    allocator.dev.synchronize()
    allocator._copyout(memoryview(out).cast("B"), buf._buf)
    return out


def rng_state() -> dict:
    """tinygrad's random state: its seed and, per device, the seed tensor and the counter of numbers drawn."""
    # read, not Tensor.tolist: a training loop takes this before every episode (0.7 ms against 0.1)
    return {"seed": Tensor._seed, "devices": {device: [read(Tensor._device_seeds[device].realize()).tolist(),
                                                       read(counter.realize()).tolist()]
                                              for device, counter in Tensor._device_rng_counters.items()}}


def set_rng_state(state: dict) -> None:
    Tensor.manual_seed(state["seed"])
    for device, (seed, counter) in state["devices"].items():
        Tensor._device_seeds[device] = Tensor(seed, device=device, dtype=dtypes.uint32)
        Tensor._device_rng_counters[device] = Tensor(counter, device=device, dtype=dtypes.uint32)


