"""KUEA kernel alignment (METHOD.md §4): match the student's normalised polynomial kernel to the teacher's.

Every function here takes the batch exactly as it should be compared. Under DDP the kernel has to span the global
batch, so the caller gathers z, z0 and zt across ranks (z with gradient, e.g. open_clip's
``gather_features(..., gather_with_grad=True)``) and passes the gathered tensors; nothing here communicates.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

_TINY = torch.finfo(torch.float32).tiny


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the cubic amplifies bf16/fp16 rounding too much."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def _normalized_poly_from_gram(
    gram: torch.Tensor, gamma: torch.Tensor | float, c: torch.Tensor | float, degree: int
) -> torch.Tensor:
    """Normalised polynomial kernel from a Gram matrix, so a fit over many (γ, c) reuses one matmul.

    Uses K̃ᵢⱼ = (bᵢⱼ / √|bᵢᵢ bⱼⱼ|)^degree with b = γ·gram + c, which equals k(i,j)/√(k(i,i)k(j,j)) wherever that
    is defined and never forms the (possibly huge) un-normalised powers.
    """
    base = gamma * gram + c
    inv_root = base.diagonal().abs().rsqrt()
    return (base * inv_root[:, None] * inv_root[None, :]) ** degree


def normalized_poly_kernel(
    z: torch.Tensor, gamma: torch.Tensor | float, c: torch.Tensor | float, degree: int = 3
) -> torch.Tensor:
    """K̃ᵢⱼ = k(zᵢ,zⱼ)/√(k(zᵢ,zᵢ)k(zⱼ,zⱼ)) with k(x,y) = (γ⟨x,y⟩ + c)^degree, for z of shape [B, D].

    Computed in float32 (float64 for float64 input) with autocast disabled, whatever the caller's precision
    (if the caller enables TF32 matmuls on CUDA, the Gram matrix inherits that rounding).
    Scaling γ and c together leaves K̃ unchanged; only γ/c matters. The diagonal is 1.
    """
    dtype = _compute_dtype(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        if isinstance(gamma, torch.Tensor):
            gamma = gamma.to(z)
        if isinstance(c, torch.Tensor):
            c = c.to(z)
        return _normalized_poly_from_gram(z @ z.T, gamma, c, degree)


def _teacher_kernel(zt: torch.Tensor, degree: int) -> torch.Tensor:
    """The fixed target: γ = 1/D, c = 1 on the teacher features, outside the autograd graph."""
    with torch.no_grad():
        return normalized_poly_kernel(zt.detach(), 1.0 / zt.shape[1], 1.0, degree)


def _kernel_gap(k_student: torch.Tensor, k_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over all B² entries, diagonal included (it contributes 0), as in the KUEA code."""
    return ((k_student - k_teacher) ** 2).mean()


class KueaTerms(NamedTuple):
    """The weighted total and its two unweighted components, for logging."""

    total: torch.Tensor
    reg: torch.Tensor
    kernel: torch.Tensor


def kuea_terms(
    z: torch.Tensor,
    z0: torch.Tensor,
    zt: torch.Tensor,
    gamma: torch.Tensor | float,
    c: torch.Tensor | float,
    w_reg: float = 1.0,
    w_kernel: float = 0.5,
    degree: int = 3,
) -> KueaTerms:
    """KUEA objective with its parts: total = w_reg·reg + w_kernel·kernel.

    z: [B, d] projected (not normalised) image embeddings of the tower being trained; z0: [B, d] the frozen
    original tower's embeddings of the same images; zt: [B, D] teacher CLS features. reg = mean_i ‖zᵢ − z0ᵢ‖²
    (summed over dims) keeps the tower near the text-aligned original; kernel = mean_ij (K̃(z; γ, c) − K̃(zt; 1/D, 1))².
    No gradient reaches z0 or zt. All math in float32 (float64 if any input is float64) with autocast disabled.
    Under DDP pass the gathered global batch (see the module docstring).
    """
    dtype = _compute_dtype(z, z0, zt)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        reg = ((z - z0.detach().to(dtype)) ** 2).sum(dim=1).mean()
        kernel = _kernel_gap(normalized_poly_kernel(z, gamma, c, degree), _teacher_kernel(zt.to(dtype), degree))
        return KueaTerms(total=w_reg * reg + w_kernel * kernel, reg=reg, kernel=kernel)


def kuea_loss(
    z: torch.Tensor,
    z0: torch.Tensor,
    zt: torch.Tensor,
    gamma: torch.Tensor | float,
    c: torch.Tensor | float,
    w_reg: float = 1.0,
    w_kernel: float = 0.5,
) -> torch.Tensor:
    """Scalar KUEA loss w_reg·mean_i‖zᵢ − z0ᵢ‖² + w_kernel·mean_ij(K̃_student − K̃_teacher)²; see `kuea_terms`."""
    return kuea_terms(z, z0, zt, gamma, c, w_reg=w_reg, w_kernel=w_kernel).total


class StudentKernel(nn.Module):
    """Trainable (γ, c) of the student's polynomial kernel, both kept positive by a log-space parametrisation.

    γ = exp(log_gamma), c = exp(log_c) (floored at the smallest normal float32 so that even a diverging optimiser
    cannot reach 0). c > 0 keeps every kernel diagonal positive, so the normalising square root is defined.
    After normalisation only γ/c matters: the loss gradients on log_gamma and log_c are exactly opposite, and
    because a joint rescale is invisible to the loss, log space makes the optimiser's behaviour independent of
    the arbitrary overall scale (c = 1 from `fit_kernel_ratio` vs 0.19 in the KUEA code). With Adam each step moves
    log(γ/c) by at most about 2·lr, so at the recipe's lr the fitted ratio drifts slowly.

    Put these parameters in an optimiser group with weight_decay = 0: decay would pull log γ and log c towards 0
    (γ, c → 1) and so drag the ratio away from where the loss puts it.
    """

    def __init__(self, gamma: float, c: float = 1.0) -> None:
        super().__init__()
        if gamma <= 0 or c <= 0:
            raise ValueError(f"StudentKernel needs gamma > 0 and c > 0, got gamma={gamma}, c={c}")
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))
        self.log_c = nn.Parameter(torch.tensor(math.log(c)))

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp().clamp_min(_TINY)

    @property
    def c(self) -> torch.Tensor:
        return self.log_c.exp().clamp_min(_TINY)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.item():.6g}, c={self.c.item():.6g}"


def _golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float) -> tuple[float, float]:
    """Minimise a unimodal f on [lo, hi] to within tol; returns (argmin, min). One f call per iteration."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    f1, f2 = f(x1), f(x2)
    while hi - lo > tol:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - inv_phi * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + inv_phi * (hi - lo)
            f2 = f(x2)
    return (x1, f1) if f1 <= f2 else (x2, f2)


def fit_kernel_ratio(
    z: torch.Tensor,
    zt: torch.Tensor,
    *,
    ratio_range: tuple[float, float] | None = None,
    grid_size: int = 33,
    tol: float = 1e-5,
    max_samples: int = 1024,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Initial student (γ, c) minimising the step-0 kernel term mean_ij(K̃(z; γ, c) − K̃(zt; 1/D, 1))².

    The KUEA code's (0.0032, 0.191623) were fitted for ViT-L/14 against DINOv2-L and do not transfer, so the ratio
    is refitted per (student, teacher) pair. z: [N, d] embeddings from the starting image tower, zt: [N, D] teacher
    features of the same images (~1k is plenty; more are subsampled to max_samples, reproducibly via seed).

    Only r = γ/c matters, so this is a 1-D search over log r: a log-spaced grid of grid_size points over
    ratio_range, then golden-section refinement (to tol in ln r) between the best grid point's neighbours. The
    result is never worse than the best grid point. The default range is r·median‖z‖² ∈ [1e-4, 1e4]; outside it
    K̃ sits on its asymptotes (all ones as r → 0, cos³ as r → ∞), where the objective is flat.

    Cost: one [n, n] Gram matrix per side (n = min(N, max_samples)), then O(n²) elementwise work per objective
    evaluation, about grid_size + 25 evaluations in float64 — well under a second for n = 1024 on a CPU.
    Returns (gamma, c) = (r*, 1.0) as Python floats, ready for `StudentKernel(gamma, c)`.
    """
    if z.shape[0] != zt.shape[0]:
        raise ValueError(f"z and zt must hold the same images, got {z.shape[0]} and {zt.shape[0]} rows")
    if z.shape[0] > max_samples:
        idx = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
        z, zt = z[idx.to(z.device)], zt[idx.to(zt.device)]
    with torch.no_grad():
        z = z.detach().to(torch.float64)
        gram = z @ z.T
        k_teacher = _teacher_kernel(zt.to(torch.float64), degree)
        if ratio_range is None:
            scale = 1.0 / gram.diagonal().median().clamp_min(_TINY).item()
            ratio_range = (scale * 1e-4, scale * 1e4)

        def objective(log_r: float) -> float:
            return _kernel_gap(_normalized_poly_from_gram(gram, math.exp(log_r), 1.0, degree), k_teacher).item()

        log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
        grid = [log_lo + (log_hi - log_lo) * i / (grid_size - 1) for i in range(grid_size)]
        values = [objective(x) for x in grid]
        best = min(range(grid_size), key=values.__getitem__)
        log_r, value = _golden_section(objective, grid[max(best - 1, 0)], grid[min(best + 1, grid_size - 1)], tol)
        if values[best] < value:
            log_r = grid[best]
    return math.exp(log_r), 1.0
