"""Diagnostics off changes nothing the run learns: a drc-r3 training step (order-3 transition heads, V5 injection)
gives the same loss and gradients bit for bit with its strength statistics computed or not, and only those
statistics go missing from its terms. The pretraining loop computes them on the steps it logs
(tests/test_engine.py checks they reach every logged step)."""

import pytest
import torch
from helpers import repo_params

from dinorankclip import diagnostics
from dinorankclip.config import resolve
from dinorankclip.train.pretrain import logs_after
from dinorankclip.train.synthetic import stand_in_teacher, synthetic_inputs, synthetic_step

pytestmark = pytest.mark.usefixtures("single_thread")


def _step(module, inputs, computed: bool) -> tuple[torch.Tensor, dict, dict]:
    """(loss, terms, gradients) of one forward and backward of the TrainStep at mid-training (rank weight > 0)."""
    module.zero_grad(set_to_none=True)
    with diagnostics.computing(computed):
        loss, terms = module(*inputs[:3], 50, 100, inputs[3])
    loss.backward()
    return loss.detach(), terms, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_a_step_without_diagnostics_learns_bit_for_bit_what_a_step_with_them_learns(tmp_path):
    cfg = resolve(repo_params(), "demo", "drc-r3")
    step = synthetic_step(cfg, 16, torch.device("cpu"), "fp32", 1, total_steps=100)
    _, width = stand_in_teacher(cfg, tmp_path)
    inputs = synthetic_inputs(cfg, step.student.model, 16, width, torch.device("cpu"))
    loss_on, terms_on, grads_on = _step(step.module, inputs, True)
    loss_off, terms_off, grads_off = _step(step.module, inputs, False)

    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 50
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_on)
    missing = set(terms_on) - set(terms_off)
    assert missing == {"transition/strength_2", "transition/strength_3", "injection/angle_deg",
                       "injection/residual_ratio", "injection/gate_mean", "injection/alpha",
                       "injection/conflict_share", "injection/conflict_removed"}
    assert set(terms_off) <= set(terms_on)
    assert all(torch.equal(torch.as_tensor(terms_on[k]), torch.as_tensor(terms_off[k])) for k in terms_off)


def test_the_loop_computes_diagnostics_on_every_logged_step_and_the_last():
    assert [s for s in range(1, 26) if logs_after(s, 10, 25)] == [10, 20, 25]
    assert all(logs_after(s, 1, 7) for s in range(1, 8))
    assert diagnostics.computed()  # on outside any block
    with diagnostics.computing(False):
        assert not diagnostics.computed()
        with diagnostics.computing(True):
            assert diagnostics.computed()
        assert not diagnostics.computed()
    assert diagnostics.computed()


def test_the_injected_towers_forward_gives_z_without_computing_diagnostics(tmp_path):
    """Evaluation and KUEA fine-tuning call the tower itself and read only z."""
    cfg = resolve(repo_params(), "demo", "drc-r3")
    visual = synthetic_step(cfg, 8, torch.device("cpu"), "fp32", 1, total_steps=100).student.model.visual
    seen = []
    visual.fusion.register_forward_hook(lambda *_: seen.append(diagnostics.computed()))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = visual(x)
        features = visual.features(x)
    assert seen == [False, True]
    assert torch.equal(z, features.z) and "angle_deg" in features.strength
