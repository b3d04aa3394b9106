"""The modality-gap analysis (METHOD.md §7) on a fixed paired set: where the image, text and teacher embeddings sit.

On the image-caption pairs of a retrieval suite (first caption of each image), with every embedding L2-normalised:
- centroid gap (Liang et al. 2022): ‖mean(image) − mean(text)‖, image = the model's final embedding z;
- the node matrix: Euclidean distances between the centroids of text, z_g (the image tower's embedding before
  injection; only for injected students), z (after the gate) and the teacher's CLS mapped into the joint space;
- alignment (Wang & Isola 2020): mean over pairs of ‖z_i − t_i‖²;
- uniformity (Wang & Isola): log mean over distinct pairs i < j of exp(−2‖x_i − x_j‖²), for images and texts.

The teacher has no projector into the joint space, so [design] its L2-normalised CLS is mapped by a least-squares
affine map to the paired caption's text embedding, fitted on the first `fit_fraction` of the pairs; every number is
then measured on the remaining pairs, so the teacher node is a held-out readout of what the frozen teacher knows
about the captions. The teacher sees the images at its own input size (the cache stage's view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The analysis runs in float64 torch, not numpy: numpy's first LAPACK call alone cost ~2.7 s on the 2-core CI
# machine (its BLAS thread pool starting), more than the whole analysis; torch's pool is already running.


def centroid_distances(nodes: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, n] Euclidean distances between the centroids of the (already normalised) node embeddings."""
    centroids = torch.stack([x.mean(dim=0) for x in nodes.values()])
    return torch.cdist(centroids, centroids)


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    """Wang & Isola's alignment (α = 2): mean squared distance between paired embeddings."""
    return (x - y).pow(2).sum(dim=1).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity: log of the mean Gaussian potential over distinct pairs (their `pdist` form)."""
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log().item()


def fit_affine(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares W ([d_source + 1, d_target], bias last row) minimising ‖[source, 1] W − target‖²."""
    return torch.linalg.lstsq(with_bias(source), target, driver="gelsd").solution


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def gap_analysis(text: torch.Tensor, z: torch.Tensor, teacher_cls: torch.Tensor, z_g: torch.Tensor | None,
                 fit_fraction: float) -> dict:
    """The analysis of the module doc from raw (unnormalised) embeddings of the same n pairs, in pair order."""
    n_fit = int(round(len(text) * fit_fraction))
    if not 2 <= n_fit <= len(text) - 2:
        raise ValueError(f"modality_gap.fit_fraction {fit_fraction}: leaves {n_fit} of {len(text)} pairs to fit the "
                         "teacher map; need at least 2 on each side")
    text, z, teacher_cls = (F.normalize(x.double(), dim=-1) for x in (text, z, teacher_cls))
    mapped = F.normalize(with_bias(teacher_cls) @ fit_affine(teacher_cls[:n_fit], text[:n_fit]), dim=-1)
    nodes = {"text": text, **({"z_g": F.normalize(z_g.double(), dim=-1)} if z_g is not None else {}), "z": z,
             "teacher": mapped}
    held = {name: x[n_fit:] for name, x in nodes.items()}
    return {"nodes": list(held), "centroid_distances": centroid_distances(held).tolist(),
            "pairs": len(text) - n_fit, "fit_pairs": n_fit,
            "metrics": {"centroid_gap": (held["z"].mean(0) - held["text"].mean(0)).norm().item(),
                        "alignment": alignment(held["z"], held["text"]),
                        "uniformity_image": uniformity(held["z"]), "uniformity_text": uniformity(held["text"])}}


def injected(visual) -> bool:
    """Whether an image tower carries a branch L with its own z_g node (V2-V6, and the distill-only control, whose
    z is its z_g; V1 and plain towers have only z)."""
    return getattr(visual, "branch", None) is not None


@torch.no_grad()
def paired_embeddings(model, teacher, loader, tokenizer, device: str, limit: int | None = None) -> dict:
    """Raw float32 embeddings of the first `limit` (all if None) (image, first caption) pairs of a retrieval
    loader: text, z, z_g (injected students only) and the teacher's CLS (`teacher(images)`)."""
    out: dict[str, list] = {"text": [], "z": [], "z_g": [], "teacher_cls": []}
    seen = 0
    for images, captions in loader:
        if limit is not None:
            images, captions = images[: limit - seen], captions[: limit - seen]
        images = images.to(device)
        with torch.autocast(device, enabled=device == "cuda"):
            if injected(model.visual):
                features = model.visual.features(images)
                z = features.z
                out["z_g"].append(features.z_g.float().cpu())
            else:
                z = model.encode_image(images)
            text = model.encode_text(tokenizer([texts[0] for texts in captions]).to(device))
        out["z"].append(z.float().cpu())
        out["text"].append(text.float().cpu())
        out["teacher_cls"].append(teacher(images).float().cpu())
        seen += len(images)
        if limit is not None and seen >= limit:
            break
    return {name: torch.cat(parts) for name, parts in out.items() if parts}
