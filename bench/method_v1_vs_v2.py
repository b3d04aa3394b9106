"""METHOD v1 against v2 on the demo, for the record (issue 17): `drc-r3` trained under v1's gate and transitions and
under v2's, on the same seeds, with the strength of both knobs and the CLIP validation loss of each.

v1 as METHOD.md's first version defined it: the gate reads the raw z_g, its projection P is random (N(0, 1/C)),
α = 0 and b = −4; the transition utilities are ⟨q, k⟩/(h·√d_h) without QK-norm or the logit scale. v2 is the code
as it stands. Needs a finished demo (its data, teacher and captions stages); prints and writes JSON:

    python bench/method_v1_vs_v2.py results/demo --seeds 0 1 2 --out docs/reference/method_v1_vs_v2.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dinorankclip.config import resolve
from dinorankclip.io import write_json
from dinorankclip.losses import ranking
from dinorankclip.models import injection
from dinorankclip.models.gate import ConflictAwareGate, GateOutput
from dinorankclip.tracking import NullTracker
from dinorankclip.train import pretrain

REPO = Path(__file__).resolve().parents[1]


class GateV1(ConflictAwareGate):
    """v1's conflict-aware gate: g = σ(W[z_g; δ; z_g⊙δ] + b) on the raw z_g, b = −4, α = 0."""

    def __init__(self, dim: int, bias_init: float = -4.0, alpha_init: float = 0.0) -> None:
        super().__init__(dim, -4.0, 0.0)

    def gated(self, z_g: torch.Tensor, delta: torch.Tensor) -> GateOutput:
        z_g, delta = z_g.float(), delta.float()
        unit = F.normalize(z_g, dim=-1)
        g = torch.sigmoid(self.gate(torch.cat([z_g, delta, z_g * delta], dim=-1)))
        r = self.alpha * g * delta
        radial = (r * unit).sum(dim=-1, keepdim=True)
        r = r - radial.clamp(max=0) * unit
        return GateOutput(z_g + r, r, g, radial.squeeze(-1))


class TransitionContextV1(ranking._TransitionContext):
    """v1's transitions: φ = ⟨q, k⟩/(h·√d_h), no QK-norm, no logit scale."""

    def __init__(self, transitions, items, scale, window, heads, strength) -> None:
        super().__init__(transitions, items, 1.0, window, heads, strength)
        head_dim = transitions[0].key.shape[1] // heads
        self.keys = [(items @ t.key.to(items)) * (torch.tanh(t.gate.to(items)) / (heads * math.sqrt(head_dim)))
                     for t in transitions]

    def __call__(self, order: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        unit = ranking._unit_heads
        ranking._unit_heads = lambda x, heads: x
        try:
            return super().__call__(order, pred)
        finally:
            ranking._unit_heads = unit


def train(cfg: dict, study: Path, out: Path, v1: bool) -> dict:
    """One pretraining run of `cfg` under v1 (patched in for this run only) or v2; its metrics.json."""
    build, variant, context = pretrain.build_student, injection.FUSION_VARIANTS["v5"], ranking._TransitionContext

    def build_v1(*args, **kwargs):
        student, *rest = build(*args, **kwargs)
        projection = student.model.visual.fusion.projection
        nn.init.normal_(projection.weight, std=projection.in_features ** -0.5)
        return (student, *rest)

    if v1:
        pretrain.build_student = build_v1
        injection.FUSION_VARIANTS["v5"] = injection.FusionVariant(inject=True, cbam=True, refiner=True, gate=GateV1)
        ranking._TransitionContext = TransitionContextV1
    try:
        out.mkdir(parents=True)
        stages = {name: study / name for name in ("teacher", "teacher_weights", "captions")}
        return pretrain.pretrain(cfg, study / "data", stages, out, NullTracker(), out / "state")
    finally:
        pretrain.build_student, injection.FUSION_VARIANTS["v5"], ranking._TransitionContext = build, variant, context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished demo study, e.g. results/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    torch.set_num_threads(args.threads)
    keys = ("transition/gamma_2", "transition/gamma_3", "transition/strength_2", "transition/strength_3",
            "injection/angle_deg", "injection/residual_ratio", "injection/gate_mean", "injection/alpha",
            "injection/conflict_share")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("v1", "v2"):
            for seed in args.seeds:
                cfg = resolve(params, "demo", "drc-r3", seed)
                cfg["pretrain"].update(threads=args.threads)
                metrics = train(cfg, args.study.resolve(), Path(tmp) / f"{version}-{seed}", version == "v1")
                rows.append({"method": version, "seed": seed, "val_clip_loss_final": metrics["val_loss"][-1],
                             "val_clip_loss_best": metrics["best_val_loss"],
                             **{k: metrics["strength"].get(k) for k in keys}})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_json(args.out, {"run": "drc-r3", "study": "demo", "rows": rows})


if __name__ == "__main__":
    main()
