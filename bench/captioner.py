"""Images/s of the captions stage's CoCa source, and the hours it would take over CC3M, at the worst case.

The captioner's cost is one image encode and up to `max_length` decoder passes per image (`greedy_tokens`). With
random weights every caption runs to `max_length` (open_clip starts the decoder's output projection at zero, so
no step picks the end token), which makes this the upper bound of the stage's time: trained weights end most
captions sooner. The images are demo-world JPEGs decoded and transformed as the stage does; that CPU side is timed
apart from the model.

Usage: python bench/captioner.py [--study paper] [--model coca_ViT-L-14] [--images 256] [--batch 64]
       [--max-length 30] [--threads 2] [--device cpu|cuda] [--out bench/results/captioner.json]
Prints the JSON report on stdout and writes it to --out.
"""

import argparse
import io
import random
import sys
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image

from dinorankclip.config import load_params, resolve
from dinorankclip.data import world
from dinorankclip.data.demo_world import jpeg_bytes
from dinorankclip.data.features import CC3M_PAIRS
from dinorankclip.io import report_json
from dinorankclip.models.captioner import caption_images, check_architecture, greedy_tokens

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "captioner.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="paper")
    p.add_argument("--model", help="an open_clip CoCa architecture (default: the study's captions.coca.model)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, help="default: the study's captions.coca.max_length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    coca = dict(resolve(load_params(), args.study)["captions"]["coca"])
    coca.update({k: v for k, v in (("model", args.model), ("max_length", args.max_length)) if v})
    check_architecture(coca["model"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(coca["model"], device=device)
    model = model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(coca["model"])
    rng = random.Random(0)
    encoded = [jpeg_bytes(world.render(world.sample_scene(rng), 256)) for _ in range(args.images)]

    start = time.perf_counter()
    decoded = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded]
    decode_s = time.perf_counter() - start
    batches = [torch.stack(decoded[i:i + args.batch]).to(device) for i in range(0, len(decoded), args.batch)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # warm-up, as the stage
        warm = greedy_tokens(model, batches[0][:2], tokenizer.sot_token_id, tokenizer.eot_token_id,
                             coca["max_length"], coca["min_length"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for images in batches:
        caption_images(model, tokenizer, images, coca)
    if device.type == "cuda":
        torch.cuda.synchronize()
    caption_s = time.perf_counter() - start

    rate = len(encoded) / caption_s
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "model": coca["model"], "max_length": coca["max_length"], "images": len(encoded), "batch": args.batch,
        "tokens_per_caption": warm.shape[1],  # start and end included: max_length is the worst case
        "decode_images_per_s": len(encoded) / decode_s, "caption_images_per_s": rate,
        "cc3m_caption_hours": CC3M_PAIRS / rate / 3600,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
