"""What the worker can tell of its GPUs: whether one is present and its memory (VRAM) in use,
for `WorkerInfo` and the admin statistics. Read from torch's CUDA runtime; on a machine
without one every figure is zero and nothing touches a driver."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuMemory:
    """The GPUs' memory, summed over every visible device, in bytes."""

    present: bool = False
    used_bytes: int = 0
    total_bytes: int = 0


NO_GPU = GpuMemory()


def gpu_memory() -> GpuMemory:
    """The visible GPUs' memory now: used (by every process, as the driver counts it) and
    total; `NO_GPU` without CUDA."""
    if not torch.cuda.is_available():
        return NO_GPU
    used = total = 0
    for device in range(torch.cuda.device_count()):
        free, device_total = torch.cuda.mem_get_info(device)
        used += device_total - free
        total += device_total
    return GpuMemory(present=True, used_bytes=used, total_bytes=total)
