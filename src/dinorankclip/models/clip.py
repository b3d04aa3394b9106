"""open_clip towers built from architecture configs, exported so that stock open_clip and clip-benchmark load them.

Architectures are data: open_clip's bundled configs (`ViT-B-16`, `RN50`, ...) plus the tiny demo towers in
`configs/`. A trained model is exported as an open_clip `local-dir`: `open_clip_config.json` (model and
preprocessing config) and `open_clip_model.safetensors`, loadable with
`open_clip.create_model_and_transforms("local-dir:<dir>")` or `clip_benchmark eval --model local-dir:<dir>`.

A student with DINOv3 injection (`dinorankclip.models.injection`) is exported the same way, with an `injection`
entry in the config; its image tower is no longer a stock open_clip tower, so it loads through `load_local_dir`
here, or through clip-benchmark with the `dinorankclip` model type (`dinorankclip.eval.model_type`).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import load_file

from dinorankclip.io import write_safetensors
from dinorankclip.models.injection import InjectedImageEncoder, default_taps, tap_widths

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def model_config(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"model.arch: unknown architecture {arch!r} (open_clip configs or {CONFIG_DIR})")
    return cfg


def injection_spec(injection: dict, tower, num_teacher_blocks: int) -> dict | None:
    """The constructor arguments of the injected image tower (taps made explicit), or None for no injection."""
    if injection["variant"] == "none":
        return None
    taps = injection["taps"] or default_taps(len(tap_widths(tower)), num_teacher_blocks)
    keys = ("variant", "channels", "reduction", "spatial_kernel", "heads", "refiner_depth", "max_grid", "gate_bias")
    return {"taps": list(taps), **{key: injection[key] for key in keys}}


def inject(model: open_clip.CLIP, spec: dict | None) -> open_clip.CLIP:
    """Replace the image tower by the injected one described by `spec` (in place; None leaves the model as is)."""
    if spec is not None:
        model.visual = InjectedImageEncoder(model.visual, **spec)
    return model


def create_clip(arch: str, injection: dict | None = None, num_teacher_blocks: int = 0):
    """(randomly initialised model, its evaluation transform, the injection spec or None); seed torch first.

    The recipe uses no augmentation (resize + centre crop), so the evaluation transform is also the training one.
    """
    model_config(arch)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    spec = injection_spec(injection, model.visual, num_teacher_blocks) if injection else None
    return inject(model, spec), preprocess, spec


def training_layout(images: torch.Tensor, visual: torch.nn.Module) -> torch.Tensor:
    """`images` [B, 3, H, W] in the memory layout the image tower `visual` (injected or not) trains fastest in:
    channels-last for a convolutional (ModifiedResNet) tower, the native layout of oneDNN's and cuDNN's convolutions
    (a quarter less CPU per step on the demo tower), else unchanged. Only the strides change; the convolutions then
    sum in another order, so results differ from the default layout's in the last bits. Evaluation keeps the
    default layout: its numbers must equal stock clip-benchmark's on the exported model."""
    tower = visual.tower if isinstance(visual, InjectedImageEncoder) else visual
    return images.contiguous(memory_format=torch.channels_last) if isinstance(tower, ModifiedResNet) else images


def export_local_dir(model: open_clip.CLIP, arch: str, out: Path, injection: dict | None = None) -> None:
    """Write `model` as an open_clip local-dir into `out` (an existing, empty directory)."""
    config = {"model_cfg": model_config(arch), "preprocess_cfg": dict(model.visual.preprocess_cfg), "arch": arch}
    if injection:
        config["injection"] = injection
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors(out / WEIGHTS_FILE, state, {"format": "pt", "arch": arch})  # byte-stable: DVC tracks it


def load_local_dir(path: Path, device: str | torch.device = "cpu"):
    """(model in eval mode, transform, tokenizer) through open_clip's own local-dir loader."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; is this an exported model directory?")
    name = f"local-dir:{path}"
    injection = json.loads((Path(path) / CONFIG_FILE).read_text()).get("injection")
    model, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=injection is None)
    if injection is not None:
        inject(model, injection).load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=True)
    model.to(device).eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def arch_of(path: Path) -> str:
    return json.loads((Path(path) / CONFIG_FILE).read_text())["arch"]


def injection_of(path: Path) -> dict | None:
    """The injection spec an exported model was built with (None for a plain open_clip model)."""
    return json.loads((Path(path) / CONFIG_FILE).read_text()).get("injection")
