"""The captioner of the `captions` stage (`captions.source: coca`): open_clip's CoCa, loaded from a local file.

Its weights are never downloaded here: a missing file is one error that names which file to get and where from
(open_clip's registry knows the Hugging Face repo of every published tag). Captions are decoded greedily — the
most likely token at each step, no end token before `min_length` tokens, an end token forced at `max_length` —
so a caption depends only on its image, not on a seed or on the batch it was decoded in. open_clip's own
`CoCa.generate` would do this with `generation_type="top_k", top_k=1`, but open_clip 3.3.0 refuses every
generation type when transformers has no `BeamSearchScorer`, which transformers 5 (the lock's) removed; the
decoding loop here is that greedy search on CoCa's public forward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)


def published_weights(model: str) -> str:
    """Where open_clip's registry says the weights of `model` are published, for the missing-file error."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    repos = [f"tag {tag}: the open_clip_pytorch_model.bin (or open_clip_model.safetensors) of the Hugging Face "
             f"repo '{open_clip.get_pretrained_cfg(model, tag)['hf_hub'].rstrip('/')}'" for tag in tags]
    if not repos:
        return f"open_clip knows no published weights for {model}; save a state dict of that architecture"
    return (f"open_clip publishes {model} as " + "; ".join(repos)
            + " (the mscoco_finetuned tags write COCO-style captions)" * any("mscoco" in t for t in tags))


def check_architecture(model: str) -> None:
    """`captions.coca.model` must name a CoCa architecture open_clip can build."""
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"captions.coca.model: {model!r} is not an open_clip architecture")
    if "multimodal_cfg" not in config:
        coca = ", ".join(m for m in open_clip.list_models() if "multimodal_cfg" in open_clip.get_model_config(m))
        raise ValueError(f"captions.coca.model: {model!r} is not a CoCa architecture (open_clip's: {coca})")


def load_captioner(coca: dict, device: torch.device) -> tuple[nn.Module, object, object]:
    """(CoCa in eval mode on `device`, its image transform, its tokenizer) from `coca.weights` on disk."""
    path = Path(coca["weights"] or "")
    if not path.is_file():
        raise FileNotFoundError(
            f"captions.coca.weights: CoCa weights file {str(path)!r} not found. Download the weights of "
            f"{coca['model']} once on a machine with network ({published_weights(coca['model'])}) and put the "
            f"file at that path, or set captions.coca.weights to where it is.")
    check_architecture(coca["model"])
    try:
        model, _, transform = open_clip.create_model_and_transforms(coca["model"], pretrained=str(path),
                                                                    device=device)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped keys
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"captions.coca.weights: {path} does not hold {coca['model']} weights ({first})") from err
    return model.eval().requires_grad_(False), transform, open_clip.get_tokenizer(coca["model"])


@torch.no_grad()
def greedy_tokens(model: nn.Module, images: torch.Tensor, sot: int, eot: int, max_length: int,
                  min_length: int) -> torch.Tensor:
    """Token ids [B, <= max_length], each row the start token, then the most likely next token at each step until
    the end token (never before `min_length` tokens, always at `max_length`); rows that ended are padded with the
    end token."""
    encoded = model(images)
    latent, embs = encoded["image_features"], encoded["image_embs"]
    out = torch.full((len(images), 1), sot, dtype=torch.long, device=images.device)
    running = torch.ones(len(images), dtype=torch.bool, device=images.device)
    while out.shape[1] < max_length and running.any():
        logits = model(None, out[running], image_latent=latent[running], image_embs=embs[running],
                       output_labels=False)["logits"][:, -1].float()
        if out.shape[1] < min_length:
            logits[:, eot] = -torch.inf
        step = torch.full((len(images),), eot, dtype=torch.long, device=images.device)
        step[running] = eot if out.shape[1] + 1 == max_length else logits.argmax(dim=-1)
        out = torch.cat([out, step[:, None]], dim=1)
        running &= step != eot
    return out


def token_text(tokenizer, ids: list[int]) -> str:
    """The caption between the start token and the first end token, as text."""
    ids = ids[1:]
    return tokenizer.decode(ids[:ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids).strip()


def caption_images(model: nn.Module, tokenizer, images: torch.Tensor, coca: dict) -> list[str]:
    """One caption per image of a transformed batch (on the model's device; bf16 autocast on GPU)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        ids = greedy_tokens(model, images, tokenizer.sot_token_id, tokenizer.eot_token_id, coca["max_length"],
                            coca["min_length"])
    return [token_text(tokenizer, row) for row in ids.tolist()]
