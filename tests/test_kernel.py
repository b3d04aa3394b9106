"""KUEA kernel-alignment objective (METHOD.md §4): values, invariances, ratio fit, gradients, precision."""

import math

import pytest
import torch

from dinorankclip.losses.kernel import (
    StudentKernel,
    fit_kernel_ratio,
    kuea_loss,
    kuea_terms,
    normalized_poly_kernel,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _loop_reference(z, z0, zt, gamma, c, w_reg, w_kernel):
    """The METHOD.md definition evaluated entry by entry on Python floats (double precision)."""
    z, z0, zt = z.tolist(), z0.tolist(), zt.tolist()
    b, big_d = len(z), len(zt[0])

    def k(x, y, g, off):
        return (g * sum(a * b for a, b in zip(x, y, strict=True)) + off) ** 3

    def k_norm(xs, i, j, g, off):
        return k(xs[i], xs[j], g, off) / math.sqrt(k(xs[i], xs[i], g, off) * k(xs[j], xs[j], g, off))

    reg = sum(sum((a - b) ** 2 for a, b in zip(z[i], z0[i], strict=True)) for i in range(b)) / b
    kernel = 0.0
    for i in range(b):
        for j in range(b):
            kernel += (k_norm(z, i, j, gamma, c) - k_norm(zt, i, j, 1.0 / big_d, 1.0)) ** 2
    kernel /= b * b
    return w_reg * reg + w_kernel * kernel, reg, kernel


@pytest.mark.parametrize(("w_reg", "w_kernel"), [(1.0, 0.5), (0.3, 2.0)])
def test_loss_matches_loop_reference(w_reg, w_kernel):
    g = torch.Generator().manual_seed(0)
    z, z0 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    zt = 3.0 * torch.randn(6, 7, generator=g)
    total, reg, kernel = _loop_reference(z, z0, zt, 0.07, 0.4, w_reg, w_kernel)
    terms = kuea_terms(z, z0, zt, 0.07, 0.4, w_reg=w_reg, w_kernel=w_kernel)
    assert kernel > 1e-3  # the kernel term is not trivially zero on these inputs
    assert terms.reg.item() == pytest.approx(reg, rel=1e-5)
    assert terms.kernel.item() == pytest.approx(kernel, rel=1e-5)
    assert terms.total.item() == pytest.approx(total, rel=1e-5)
    loss = kuea_loss(z, z0, zt, torch.tensor(0.07), torch.tensor(0.4), w_reg=w_reg, w_kernel=w_kernel)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    # float64 inputs are computed in float64, so the match is much tighter
    loss64 = kuea_loss(z.double(), z0.double(), zt.double(), 0.07, 0.4, w_reg=w_reg, w_kernel=w_kernel)
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("a", [1e-3, 0.5, 7.0, 1e4])
def test_kernel_depends_only_on_ratio(a):
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = normalized_poly_kernel(z, 0.2, 0.5)
    torch.testing.assert_close(normalized_poly_kernel(z, 0.2 * a, 0.5 * a), base, rtol=1e-10, atol=1e-12)


def test_kernel_changes_when_one_parameter_scales():
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = normalized_poly_kernel(z, 0.2, 0.5)
    assert (normalized_poly_kernel(z, 0.2 * 3, 0.5) - base).abs().max() > 1e-2
    assert (normalized_poly_kernel(z, 0.2, 0.5 * 3) - base).abs().max() > 1e-2


@pytest.mark.parametrize("norm_scale", [1e-2, 1.0, 1e3])
def test_diagonal_is_one_and_regulariser_vanishes_at_step_zero(norm_scale):
    g = torch.Generator().manual_seed(2)
    z, zt = norm_scale * torch.randn(16, 12, generator=g), torch.randn(16, 20, generator=g)
    k = normalized_poly_kernel(z, 0.05, 1.0)
    torch.testing.assert_close(k.diagonal(), torch.ones(16), rtol=0, atol=1e-6)
    terms = kuea_terms(z, z.clone(), zt, 0.05, 1.0, w_reg=1.0, w_kernel=0.5)
    assert terms.reg.item() == 0.0
    assert terms.kernel.item() > 0.0
    assert terms.total.item() == pytest.approx(0.5 * terms.kernel.item(), rel=1e-7)


def _scaled_copy_of_teacher(n, dim_t, dim_s, a, seed):
    """Student = a · (teacher rotated into a bigger space): Gram_s = a²·Gram_t, so r* = 1/(D·a²) matches exactly."""
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, dim_t, generator=g, dtype=torch.float64) + 0.5
    q, _ = torch.linalg.qr(torch.randn(dim_s, dim_t, generator=g, dtype=torch.float64))  # orthonormal columns
    return a * zt @ q.T, zt


@pytest.mark.parametrize("a", [0.05, 3.0, 40.0])
def test_fit_recovers_known_ratio(a):
    z, zt = _scaled_copy_of_teacher(300, 16, 24, a, seed=3)
    gamma, c = fit_kernel_ratio(z.float(), zt.float())
    assert c == 1.0
    assert gamma / c == pytest.approx(1.0 / (16 * a * a), rel=1e-3)
    assert kuea_terms(z, z, zt, gamma, c).kernel.item() < 1e-10


def test_fit_is_never_worse_than_the_grid():
    z, zt = _scaled_copy_of_teacher(200, 16, 24, 3.0, seed=4)
    z = z + 2.0 * torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=z.dtype)  # no exact match
    lo, hi, n = 1e-4, 1e2, 13  # optimum ≈ 0.0036 lies between grid points 0.0032 and 0.01
    gamma, c = fit_kernel_ratio(z, zt, ratio_range=(lo, hi), grid_size=n)

    def kernel_term(r):
        return kuea_terms(z, z, zt, r, 1.0).kernel.item()

    fitted = kernel_term(gamma / c)
    grid = [kernel_term(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
    assert fitted <= min(grid) + 1e-15
    assert 1e-3 < fitted < min(grid) - 1e-4  # a real residual, and the refinement improved on the grid
    for step in (1e-2, 1e-3):
        assert fitted <= kernel_term(gamma / c * math.exp(step)) + 1e-15
        assert fitted <= kernel_term(gamma / c * math.exp(-step)) + 1e-15


def test_fit_subsamples_reproducibly():
    z, zt = _scaled_copy_of_teacher(1500, 8, 8, 2.0, seed=5)
    first = fit_kernel_ratio(z, zt, max_samples=256, seed=7)
    assert fit_kernel_ratio(z, zt, max_samples=256, seed=7) == first
    assert first[0] == pytest.approx(1.0 / (8 * 4.0), rel=1e-3)


def test_gradients_reach_z_gamma_c_but_not_anchor_or_teacher():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(10, 6, generator=g).requires_grad_()
    z0 = torch.randn(10, 6, generator=g).requires_grad_()
    zt = torch.randn(10, 9, generator=g).requires_grad_()
    kernel = StudentKernel(0.1, 1.0)
    kuea_loss(z, z0, zt, kernel.gamma, kernel.c).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert z0.grad is None and zt.grad is None
    g_gamma, g_c = kernel.log_gamma.grad.item(), kernel.log_c.grad.item()
    assert g_gamma != 0.0
    # only γ/c enters the loss, so the log-space gradients cancel exactly (to rounding)
    assert g_c == pytest.approx(-g_gamma, rel=1e-4)


def test_student_kernel_stays_positive_under_a_huge_step():
    module = StudentKernel(0.02, 1.0)
    assert module.gamma.item() == pytest.approx(0.02) and module.c.item() == pytest.approx(1.0)
    opt = torch.optim.SGD(module.parameters(), lr=1e6)
    (1e6 * (module.c + module.gamma)).backward()  # drive both hard towards (and past) zero
    opt.step()
    assert module.c.item() > 0.0 and module.gamma.item() > 0.0
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(kuea_loss(z, z, z, module.gamma, module.c))


def test_kernel_math_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(9)
    z, zt = torch.randn(32, 64, generator=g), torch.randn(32, 48, generator=g)
    z0 = z + 0.01 * torch.randn(32, 64, generator=g)
    gamma = torch.tensor(0.05)
    ref_kernel = normalized_poly_kernel(z, gamma, 1.0)
    ref_loss = kuea_loss(z, z0, zt, gamma, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z @ z.T).dtype == torch.bfloat16  # autocast is really active here
        kernel = normalized_poly_kernel(z, gamma, 1.0)
        loss = kuea_loss(z, z0, zt, gamma, 1.0)
        from_bf16 = normalized_poly_kernel(z.bfloat16(), gamma, 1.0)
    assert kernel.dtype == torch.float32 and loss.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(kernel, ref_kernel, rtol=0, atol=1e-6)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(from_bf16, normalized_poly_kernel(z.bfloat16().float(), gamma, 1.0), rtol=0, atol=1e-6)
