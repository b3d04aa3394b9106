"""Time and peak memory of HighOrderRankLoss forward+backward over order R and batch B; fits time ∝ B^exponent.

The order-R loss is designed to cost O(B²·K·h·d_h) per ranking term at a fixed window K — quadratic in B and
linear in R — so the fitted exponent of time vs B should stay near 2 (the first-order sort adds a log B).

Memory, by device:
  cuda: torch.cuda.max_memory_allocated() during one forward+backward minus what was allocated before it
        (tensors the caching allocator handed out; the features and module are already resident).
  cpu:  growth of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs just before
        the step) over the resident set at the start of the step: every page the step's tensors touched. glibc is
        told to serve every allocation of ≥ 64 KiB by mmap, so freed tensors leave the resident set at once and an
        earlier grid point's freed heap cannot hide a later one's peak. Null where the reset is not permitted.

Usage: python bench/loss_scaling.py [--quick] [--out bench/results/loss_scaling.json] [--repeats 3] [--device cpu]
       [--threads 1]
Prints the JSON report on stdout (progress goes to stderr) and writes it to --out.
"""

import argparse
import ctypes
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dinorankclip.io import write_json
from dinorankclip.losses.ranking import HighOrderRankLoss

DIM = 512
ORDERS = (0, 1, 2, 3, 4)
FULL_BATCHES = (256, 512, 1024, 2048)
QUICK_BATCHES = (128, 256)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "loss_scaling.json"


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _map_large_allocations(threshold: int = 64 * 1024) -> bool:
    """mallopt(M_MMAP_THRESHOLD): large blocks come from mmap and return to the OS when freed (glibc only)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Extra memory at the peak of one call of ``step``, as the module docstring defines per device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_peak_rss():
        step()
        return None
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _seconds(step: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call, synchronising the device so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(order: int, batch: int, repeats: int, device: torch.device) -> dict:
    """One grid point: the first call measures memory (and warms up), the next ``repeats`` are timed."""
    generator = torch.Generator().manual_seed(batch)
    image = F.normalize(torch.randn(batch, DIM, generator=generator), dim=1).to(device).requires_grad_(True)
    text = F.normalize(torch.randn(batch, DIM, generator=generator), dim=1).to(device).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    module = HighOrderRankLoss(order, DIM).to(device)
    with torch.no_grad():
        for transition in module.transitions:  # open gates: same cost, but the transition path is live
            transition.gate.fill_(0.5)

    def step() -> None:
        image.grad = text.grad = scale.grad = None
        module.zero_grad(set_to_none=True)
        module(image, text, scale, 2.0).backward()

    peak = _peak_bytes(step, device)
    times = [_seconds(step, device) for _ in range(repeats)]
    return {
        "order": order,
        "batch": batch,
        "seconds": statistics.median(times),
        "seconds_all": times,
        "peak_bytes": peak,
    }


def fit_exponent(batches: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(batch)."""
    xs, ys = [math.log(b) for b in batches], [math.log(s) for s in seconds]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES} instead of {FULL_BATCHES}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls per point (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op CPU threads; 1 avoids spin-wait stalls on shared cores"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not _map_large_allocations():
        print("mallopt unavailable: CPU peak RSS may be hidden by reused heap", file=sys.stderr)
    batches = QUICK_BATCHES if args.quick else FULL_BATCHES

    measure(max(ORDERS), 8, 1, device)  # one-off lazy initialisation must not land in the first grid point
    results = []
    for order in ORDERS:
        for batch in batches:
            results.append(measure(order, batch, args.repeats, device))
            print(
                f"R={order} B={batch}: {results[-1]['seconds']:.4f} s, {results[-1]['peak_bytes']} B", file=sys.stderr
            )
    exponents = {
        str(order): fit_exponent(
            [r["batch"] for r in results if r["order"] == order], [r["seconds"] for r in results if r["order"] == order]
        )
        for order in ORDERS
    }
    memory_method = "cuda max_memory_allocated delta" if device.type == "cuda" else "cpu peak RSS (VmHWM) delta"
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dim": DIM,
        "window": 32,
        "heads": 4,
        "head_dim": 64,
        "repeats": args.repeats,
        "memory_method": memory_method,
        "results": results,
        "exponents": exponents,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
