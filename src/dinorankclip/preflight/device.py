"""The GPUs a job on this machine sees: name, memory, and the NVIDIA driver against the one the locked torch needs.

The locked torch is a CUDA 13.2 build (`+cu132`); NVIDIA's minor-version compatibility lets any CUDA 13.x build run
on a driver of the 580 series or newer, so 580 is the floor (CUDA 12.x builds: 525). The driver version is read
from `nvidia-smi`, or from the kernel module's /proc file when nvidia-smi is not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import torch

from dinorankclip.preflight.result import Check

MIN_DRIVER = {13: 580, 12: 525}  # CUDA major of the torch build -> the lowest driver series it runs on
PROC_VERSION = Path("/proc/driver/nvidia/version")


def driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.split()[0]
    if PROC_VERSION.is_file():
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", PROC_VERSION.read_text())
        return found.group(1) if found else None
    return None


def gpu_check(gpus_per_node: int) -> Check:
    """Visible GPUs and the driver; on a machine without one, says so (every device-only check is then skipped)."""
    if not torch.cuda.is_available():
        return Check("GPUs", "skip", "no GPU visible (torch.cuda.is_available() is False): the driver, peak memory "
                     "and projected time are measured only on a GPU node (e.g. `srun --gpus=1 dinorankclip "
                     "preflight ...`)", device_only=True)
    devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    names = ", ".join(f"{d.name} ({d.total_memory / 2**30:.0f} GiB)" for d in devices)
    driver, cuda = driver_version(), torch.version.cuda or ""
    floor = MIN_DRIVER.get(int(cuda.split(".")[0])) if cuda else None
    values = {"devices": [{"name": d.name, "memory_bytes": d.total_memory} for d in devices], "driver": driver,
              "torch_cuda": cuda, "min_driver": floor}
    if driver and floor and int(driver.split(".")[0]) < floor:
        return Check("GPUs", "fail", f"{names}; driver {driver} is older than the {floor} series the locked torch "
                     f"(CUDA {cuda}) needs", fix=f"install an NVIDIA driver of the {floor} series or newer",
                     device_only=True, values=values)
    short = f"; this node shows {len(devices)} of the {gpus_per_node} a training job asks" \
        if len(devices) < gpus_per_node else ""
    return Check("GPUs", "warn" if short else "ok", f"{names}; driver {driver or 'unknown'} (torch CUDA {cuda}, "
                 f"needs >= {floor}){short}", device_only=True, values=values)
