"""The process the engine runs in: an Accelerator that also joins CPU processes, the strategy it distributes
with, and CPU settings that only change speed (threads, the allocator keeping freed memory)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def warn_if_cpu_threads_capped(accelerator) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 on CPU unless told otherwise, which can make a
    single-process CPU run several times slower than it need be."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() < cores:
        logger.warning("training on CPU with %d of %d cores (OMP_NUM_THREADS=%s); pass "
                       "`--num_cpu_threads_per_process %d` to accelerate launch to use them all",
                       torch.get_num_threads(), cores, os.environ.get("OMP_NUM_THREADS"), cores)


def warn_if_workers_exceed_cores(num_workers: int, num_processes: int = 1) -> bool:
    """Data-loading workers beyond the cores this process may use compete with training for them: warn, naming
    the number that fits."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(cores // max(num_processes, 1), 1)
    if num_workers < per_process:
        return False
    logger.warning("train.num_workers=%d data-loading workers per process, on %d core(s) per process: they compete "
                   "with training for them; use at most %d", num_workers, per_process, max(per_process - 1, 0))
    return True


def native_cpu_bf16() -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); None where torch cannot tell."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(c) for c in checks):
        return None
    return any(c() for c in checks)


def warn_if_slow_bf16(mixed_precision: str, device_type: str) -> bool:
    """bf16 on a CPU without bf16 hardware is emulated and slower than fp32: warn, naming the setting to use.
    (On this project's 2-core AVX512-BF16 machine bf16 took 0.62 s a step against 0.69-0.73 in fp32; a CPU
    without it was 3-7 times slower in bf16.)"""
    if mixed_precision != "bf16" or device_type != "cpu" or native_cpu_bf16() is not False:
        return False
    logger.warning("train.mixed_precision=bf16 on a CPU without bf16 hardware (no AVX512-BF16 or AMX): it is emulated "
                   "and slower than fp32; set train.mixed_precision=no")
    return True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> bool:
    """Let glibc's allocator keep the memory a CPU training step frees, for the next step to reuse.

    By default it returns large blocks to the system and takes them back the next step, page by page: on the
    shapes preset (2 cores) that is about 38,000 page faults and 0.11 s of system CPU time per step, against
    none with freed memory kept; the step took 0.63 s against 0.66 s (mean of two runs of 40 steps each).
    Changes nothing but speed and the process's resident size; a no-op (False) where the C library is not
    glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def make_accelerator(mixed_precision: str = "no"):
    """An Accelerator that also forms a process group for several CPU processes.

    On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N processes, but
    Accelerate only joins them (over gloo) when asked for the CPU; otherwise each would train alone and
    all would write the same run folder.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and AcceleratorState._shared_state:
        # A second run in the same process (a notebook, the tests) may ask for another precision.
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=world > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but Accelerate joined {accelerator.num_processes}")
    return accelerator
