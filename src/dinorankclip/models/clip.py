"""open_clip towers built from architecture configs, exported so that stock open_clip and clip-benchmark load them.

Architectures are data: open_clip's bundled configs (`ViT-B-16`, `RN50`, ...) plus the tiny demo towers in
`configs/`. A trained model is exported as an open_clip `local-dir`: `open_clip_config.json` (model and
preprocessing config) and `open_clip_model.safetensors`, loadable with
`open_clip.create_model_and_transforms("local-dir:<dir>")` or `clip_benchmark eval --model local-dir:<dir>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def model_config(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"model.arch: unknown architecture {arch!r} (open_clip configs or {CONFIG_DIR})")
    return cfg


def create_clip(arch: str) -> tuple[open_clip.CLIP, object]:
    """A randomly initialised model (seed torch first) and its evaluation transform.

    The recipe uses no augmentation (resize + centre crop), so the evaluation transform is also the training one.
    """
    model_config(arch)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return model, preprocess


def export_local_dir(model: open_clip.CLIP, arch: str, out: Path) -> None:
    """Write `model` as an open_clip local-dir into `out` (an existing, empty directory)."""
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_config(arch), "preprocess_cfg": preprocess_cfg,
                                                "arch": arch}, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "arch": arch})


def load_local_dir(path: Path, device: str | torch.device = "cpu"):
    """(model in eval mode, transform, tokenizer) through open_clip's own local-dir loader."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; is this an exported model directory?")
    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def arch_of(path: Path) -> str:
    return json.loads((Path(path) / CONFIG_FILE).read_text())["arch"]
