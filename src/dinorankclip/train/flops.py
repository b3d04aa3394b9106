"""FLOPs of a training step, the peak FLOP/s of the device, and model FLOPs utilisation (MFU).

FLOPs are counted, not estimated: `step_flops` runs one real step under torch's `FlopCounterMode`, which counts
matmuls, convolutions and attention (a multiply-add is 2 FLOPs, as in open_clip's profile and nanoGPT's MFU) and
ignores element-wise work. So injected towers, the ranking heads and an online teacher are all in the count
without a formula to keep up to date. MFU = counted FLOPs per step × steps/s ÷ peak FLOP/s.

The peak of a known GPU comes from NVIDIA's datasheet (dense tensor-core numbers, i.e. half the "with sparsity"
figures). A CPU has no such number a benchmark can rely on, so its peak is measured: the best rate of a large fp32
matmul at the thread count the run uses; an unknown GPU is measured the same way.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peaks in FLOP/s, (name substring, bf16, tf32, fp32), from NVIDIA's datasheets: H100 (SXM5 / PCIe / NVL),
# H200 (SXM / NVL) and A100 (SXM4 and PCIe share the peak). bf16 and tf32 are tensor-core rates without sparsity;
# fp32 is the plain (non-tensor) rate, what an fp32 matmul gets while TF32 is off — torch's default.
# The first substring found in the device name wins, so the variants come before the plain names.
CUDA_PEAKS = (
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100 NVL", 835e12, 418e12, 60e12),
    ("H200 NVL", 835e12, 418e12, 60e12),
    ("H100", 989e12, 495e12, 67e12),  # SXM5, named e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989e12, 495e12, 67e12),  # SXM
    ("A100", 312e12, 156e12, 19.5e12),
)
PRECISIONS = ("bf16", "tf32", "fp32")


def step_flops(run_step: Callable[[], None]) -> int:
    """FLOPs of `run_step()` (one forward and backward, and whatever else it does), counted as torch runs it."""
    with FlopCounterMode(display=False) as counter:
        run_step()
    return counter.get_total_flops()


def datasheet_peak(name: str, precision: str) -> float | None:
    """The dense peak of the GPU called `name` at `precision` (bf16, tf32, fp32), or None for a GPU not listed."""
    column = PRECISIONS.index(precision)
    for key, *peaks in CUDA_PEAKS:
        if key in name:
            return peaks[column]
    return None


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best wall time of an n×n by n×n matmul over `repeats` runs (after one untimed run)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_peak(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """Achieved FLOP/s of a large matmul with `threads` CPU threads; measured once per process and arguments."""
    n = 1024 if device.type == "cpu" else 8192
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return 2 * n**3 / matmul_seconds(device, dtype, n, repeats=5)
    finally:
        torch.set_num_threads(before)


def peak_flops(device: torch.device, precision: str, threads: int) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for `precision` on `device`.

    On CUDA, "fp32" means TF32 tensor cores when torch's float32 matmul precision allows them, else plain fp32.
    A CPU always runs fp32 (the training step autocasts on CUDA only), so `precision` does not change its peak.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
            precision = "tf32"
        peak = datasheet_peak(name, precision)
        if peak is not None:
            return peak, f"NVIDIA datasheet, {name}, dense {precision}"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measured_peak(device, dtype, threads), f"measured {precision} matmul peak, {name}"
    return measured_peak(device, torch.float32, threads), f"measured fp32 matmul peak, {threads} threads"


def mfu(flops_per_step: int, steps_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: the fraction of the peak that the counted step FLOPs reach."""
    return flops_per_step * steps_per_second / peak


def device_hours(seconds: float, device: torch.device, threads: int, world_size: int = 1) -> tuple[float, str]:
    """(hours, unit) for matched-compute comparisons: GPU-hours on CUDA, CPU-core-hours (threads × hours) on CPU."""
    if device.type == "cuda":
        return seconds / 3600 * world_size, "GPU-hours"
    return seconds / 3600 * threads * world_size, "CPU-core-hours"
