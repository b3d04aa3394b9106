"""FLOP counting, device peaks and MFU (`dinorankclip.train.flops`), and the step benchmark end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, venv_env
from torch import nn

from dinorankclip.train import flops

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.mark.parametrize("input_grad", [False, True])
def test_step_flops_of_a_linear_layer_is_the_closed_form(input_grad):
    batch, d_in, d_out = 5, 7, 3
    layer = nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(batch, d_in, requires_grad=input_grad)

    def run_step() -> None:
        layer(x).sum().backward()

    # Each matmul [m, k] @ [k, n] is m·k·n multiply-adds = 2·m·k·n FLOPs, and here every one is B·in·out MACs:
    #   forward      y  = x @ Wᵀ       [B, in] @ [in, out]
    #   backward  dL/dW = gᵀ @ x       [out, B] @ [B, in]    (always: W requires grad)
    #             dL/dx = g @ W        [B, out] @ [out, in]  (only when x requires grad)
    # The sum and its backward (an expand) are element-wise, which torch does not count.
    matmuls = 3 if input_grad else 2
    assert flops.step_flops(run_step) == matmuls * 2 * batch * d_in * d_out  # 420 or 630


def test_mfu_is_achieved_over_peak():
    assert flops.mfu(3_000_000_000, 4.0, 48e9) == pytest.approx(0.25)
    assert flops.mfu(123, 0.0, 1e12) == 0.0


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM5
    ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200 NVL", "bf16", 835e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_datasheet_peak_by_device_name(name, precision, peak):
    assert flops.datasheet_peak(name, precision) == peak


def test_cuda_peak_uses_the_table_and_tf32_when_torch_allows_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.peak_flops(cuda, "bf16", 1) == (989e12, "NVIDIA datasheet, NVIDIA H100 80GB HBM3, dense bf16")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert flops.peak_flops(cuda, "fp32", 1)[0] == 67e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert flops.peak_flops(cuda, "fp32", 1)[0] == 495e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(flops, "measured_peak", lambda device, dtype, threads: {torch.bfloat16: 1e14}[dtype])
    assert flops.peak_flops(cuda, "bf16", 1) == (1e14, "measured bf16 matmul peak, NVIDIA GeForce RTX 4090")


@pytest.fixture
def fresh_peak_cache():
    flops.measured_peak.cache_clear()
    yield
    flops.measured_peak.cache_clear()


def test_cpu_peak_is_a_real_measurement(fresh_peak_cache):
    peak, source = flops.peak_flops(CPU, "fp32", 1)
    assert 1e9 < peak < 1e13  # one core: a few to a few hundred GFLOP/s
    assert source == "measured fp32 matmul peak, 1 threads"


def test_cpu_peak_is_measured_once_per_thread_count(fresh_peak_cache, monkeypatch):
    calls = []

    def fake_seconds(device, dtype, n, repeats):
        calls.append((n, dtype, torch.get_num_threads()))
        return 0.5

    monkeypatch.setattr(flops, "matmul_seconds", fake_seconds)
    expected = 2 * 1024**3 / 0.5
    assert flops.peak_flops(CPU, "fp32", 1) == (expected, "measured fp32 matmul peak, 1 threads")
    assert flops.peak_flops(CPU, "bf16", 1)[0] == expected  # CPU runs fp32 either way: same cached number
    assert calls == [(1024, torch.float32, 1)]
    assert flops.peak_flops(CPU, "fp32", 2) == (expected, "measured fp32 matmul peak, 2 threads")
    assert calls[1:] == [(1024, torch.float32, 2)]  # measured with the threads asked for ...
    assert torch.get_num_threads() == 1  # ... and the process's setting restored


def test_step_bench_compares_with_open_clip():
    cmd = [sys.executable, str(REPO / "bench" / "step.py"), "--study", "demo", "--run", "clip", "--batch", "8",
           "--steps", "1", "--warmup", "0", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["run"], report["arch"], report["batch"]) == ("clip", "demo-rn-tiny", 8)
    assert report["samples_per_s"] > 0 and report["open_clip_samples_per_s"] > 0
    assert report["ratio_to_open_clip"] == pytest.approx(report["samples_per_s"] / report["open_clip_samples_per_s"])
    # the clip run is open_clip's tower and loss: the same matmuls, so exactly the same counted FLOPs
    assert report["step_flops"] == report["open_clip_step_flops"] > 0
    assert report["mfu"] == pytest.approx(report["step_flops"] * report["samples_per_s"] / 8 / report["peak_flops"])
