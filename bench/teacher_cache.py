"""Images/s of the teacher-cache stage, split into JPEG decode + transform (the CPU side) and the teacher forward.

The cache is computed once per image, so its cost is one pass of the teacher over the dataset; what bounds it is
either decoding (CPU workers) or the forward (GPU). This times both halves separately on the same images, with
the same code the `teacher` stage runs (`dinorankclip.data.features`), and reports their rates, the rate of the
two in series, and bytes per cached image with the CC3M projection.

Images: the shards of a data stage output (`--data results/<study>/data`), or, without one, JPEGs rendered from
the demo world (`--images N`). The teacher: the study's (`--study`), randomly initialised — speed does not
depend on the weights — or any timm name with `--model` (e.g. vit_base_patch16_dinov3 at `--size 224`).

Usage: python bench/teacher_cache.py [--study demo] [--model NAME --size 224] [--data DIR] [--images 512]
       [--batch 256] [--threads 2] [--device cpu|cuda] [--out bench/results/teacher_cache.json]
Prints the JSON report on stdout and writes it to --out.
"""

import argparse
import io
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from dinorankclip.config import load_params, resolve
from dinorankclip.data import features, world
from dinorankclip.data.demo_world import jpeg_bytes
from dinorankclip.io import report_json
from dinorankclip.models.clip import model_config
from dinorankclip.models.teacher import create_teacher, frozen, teacher_transform

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "teacher_cache.json"


def jpegs(data: Path | None, count: int, size: int) -> list[bytes]:
    """`count` encoded images: from the data stage's shards if given, else rendered demo scenes."""
    if data is None:
        rng = random.Random(0)
        return [jpeg_bytes(world.render(world.sample_scene(rng), size)) for _ in range(count)]
    import tarfile

    out = []
    for shard in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith((".jpg", ".jpeg", ".png", ".webp"))]
        if len(out) >= count:
            break
    return out[:count]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="demo")
    p.add_argument("--model", help="timm model name (default: the study's teacher)")
    p.add_argument("--size", type=int, help="input resolution (default: the study's student image size)")
    p.add_argument("--data", type=Path, help="a data stage output to read images from")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve(load_params(), args.study)
    teacher = dict(cfg["teacher"], batch_size=args.batch)
    if args.model:
        teacher.update(model=args.model, model_kwargs={})
    size = args.size or model_config(cfg["model"]["arch"])["vision_cfg"]["image_size"]
    if args.size:
        teacher["model_kwargs"] = {**teacher["model_kwargs"], "img_size": size}
    device = torch.device(args.device)
    model = frozen(create_teacher(teacher), device)
    transform = teacher_transform(size)
    encoded = jpegs(args.data, args.images, cfg["data"]["image_size"])

    start = time.perf_counter()
    decoded = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded]
    decode_s = time.perf_counter() - start
    batches = [torch.stack(decoded[i:i + args.batch]) for i in range(0, len(decoded), args.batch)]
    features.batch_features(model, batches[0], teacher, device)  # warm-up (kernels, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for images in batches:
        cls, patches = features.batch_features(model, images, teacher, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start

    channels = min(patches.shape[2], teacher["pca_dim"])
    bytes_per_image = 2 * (cls.shape[1] + len(teacher["blocks"]) * channels * teacher["grid"] ** 2)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "model": teacher["model"], "image_size": size, "images": len(encoded), "batch": args.batch,
        "decode_images_per_s": len(encoded) / decode_s, "forward_images_per_s": len(encoded) / forward_s,
        "serial_images_per_s": len(encoded) / (decode_s + forward_s),
        "payload_bytes_per_image": bytes_per_image,
        "cc3m_projected_gb": bytes_per_image * features.CC3M_PAIRS / 1e9,
    }
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
