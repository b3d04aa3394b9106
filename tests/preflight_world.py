"""The inputs of the preflight study (studies/preflight.yaml), made where the paper study expects its own.

- a CC3M-format caption list (caption<TAB>url, no header) served on 127.0.0.1 with its images: 16 images in the
  formats a web crawl meets (EXIF-rotated, 16-bit grayscale, CMYK, RGBA, palette, grayscale, WebP, progressive
  JPEG, 24 megapixels, 4 pixels, panorama, portrait), 2 dead links (a 404 and a refused port) and 1 malformed row;
- the second captions (`url<TAB>caption`) at the paper's `captions.file`;
- a DINOv3 ViT-B/16 in timm's key layout, seeded, at the paper's `teacher.weights.path`;
- three suites in clip-benchmark's `wds_` layout under the paper's `dataset_root`, 8 images each, with real class
  names and templates (clip-benchmark's own; CIFAR-10's names as its dataset defines them): zero-shot
  classification (CIFAR-10), retrieval (MS-COCO captions, 5 per image) and the linear probe (Pets, train and test);
- an ImageNet-layout image folder for KUEA (`train/<wnid>/<wnid>_<n>.JPEG`).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

LIST = "Train_GCC-training.tsv"
VALIDATION_LIST = "Validation_GCC-1.1.0-Validation.tsv"
VALIDATION_SERVED = 3
SERVED, DEAD, MALFORMED = 16, 2, 1
SUITE_SIZE = 8
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REFUSED_PORT = 1  # nothing listens on tcpmux: the link is refused at once


def _scene(rng: random.Random, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Shapes on a gradient: a picture with edges and texture, so encoders and resizers do real work."""
    w, h = size
    image = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(w), rng.randrange(h)
        r = max(1, min(w, h) // rng.randint(4, 10))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def real_world_images(seed: int = 0) -> dict[str, bytes]:
    """File name -> bytes of the 16 served images."""
    rng = random.Random(seed)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90° clockwise
    gray16 = Image.fromarray((np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16))
    rgba = _scene(rng, (320, 320), "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((320, 320)))
    images = {
        "phone-exif-rotated.jpg": _encode(_scene(rng, (640, 480)), "JPEG", quality=90, exif=exif),
        "scan-16bit-gray.png": _encode(gray16, "PNG"),
        "print-cmyk.jpg": _encode(_scene(rng, (400, 300), "CMYK"), "JPEG", quality=90),
        "logo-rgba.png": _encode(rgba, "PNG"),
        "icon-palette.gif": _encode(_scene(rng, (200, 200)).convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "old-photo-gray.jpg": _encode(_scene(rng, (500, 400), "L"), "JPEG", quality=85),
        "photo.webp": _encode(_scene(rng, (480, 360)), "WEBP", quality=80),
        "progressive.jpg": _encode(_scene(rng, (600, 400)), "JPEG", quality=85, progressive=True),
        "huge-24mp.jpg": _encode(_scene(rng, (6000, 4000)), "JPEG", quality=80),
        "tiny-4px.png": _encode(_scene(rng, (4, 4)), "PNG"),
        "panorama.jpg": _encode(_scene(rng, (1600, 300)), "JPEG", quality=90),
        "portrait.jpg": _encode(_scene(rng, (300, 1000)), "JPEG", quality=90),
    }
    for i in range(SERVED - len(images)):
        images[f"photo-{i}.jpg"] = _encode(_scene(rng, (rng.randint(300, 900), rng.randint(300, 900))), "JPEG",
                                           quality=rng.randint(70, 95))
    return images


def write_caption_list(www: Path, port: int, seed: int = 0) -> dict:
    """The served images and the CC3M-format list under `www`; the list's URLs point at 127.0.0.1:`port`."""
    base = f"http://127.0.0.1:{port}"
    (www / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, data in real_world_images(seed).items():
        (www / "img" / name).write_bytes(data)
        rows.append((f"a picture named {name.rsplit('.', 1)[0].replace('-', ' ')}", f"{base}/img/{name}"))
    rows += [("a link that went dead", f"{base}/img/gone.jpg"),
             ("a host that refuses", f"http://127.0.0.1:{REFUSED_PORT}/img/refused.jpg")]
    random.Random(seed).shuffle(rows)
    lines = [f"{caption}\t{url}" for caption, url in rows] + ["a caption whose url was lost"]
    (www / LIST).write_text("\n".join(lines) + "\n")
    # the validation list: the first served images again (CC3M's lists are disjoint; what matters here is that the
    # data stage downloads a second list into data/val and pretraining validates on it) and one dead link
    held_out = [row for row in rows if not row[1].endswith(("gone.jpg", "refused.jpg"))][:VALIDATION_SERVED]
    held_out.append(("a validation link that went dead", f"{base}/img/gone-val.jpg"))
    (www / VALIDATION_LIST).write_text("".join(f"{caption}\t{url}\n" for caption, url in held_out))
    return {"urls": [url for _, url in rows], "rows": len(lines)}


def write_second_captions(path: Path, urls: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("url\tcaption\n" + "".join(f"{url}\ta detailed description of {url.rsplit('/', 1)[1]}\n"
                                               for url in urls))


def write_teacher(path: Path, model: str = "vit_base_patch16_dinov3", seed: int = 0,
                  kwargs: dict | None = None) -> None:
    """A randomly initialised timm model saved with timm's own state-dict keys (what the hub file holds)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model(model, pretrained=False, num_classes=0, **(kwargs or {})).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def write_wds_suite(root: Path, split: str, samples: list[dict], extra_files: dict[str, str], shards: int = 1) -> None:
    """One split of a clip-benchmark `wds_` dataset: `<split>/0.tar` ... and `nshards.txt`, plus its text files."""
    import webdataset as wds

    (root / split).mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with wds.TarWriter(str(root / split / f"{shard}.tar"), mtime=0) as sink:
            for i, sample in enumerate(samples[shard::shards]):
                sink.write({"__key__": f"s{shard}{i:06d}", **sample})
    (root / split / "nshards.txt").write_text(f"{shards}\n")
    for name, text in extra_files.items():
        (root / name).write_text(text)


def write_suites(dataset_root: Path, seed: int = 0, shards: int = 1) -> None:
    """CIFAR-10 (classification), MS-COCO captions (retrieval) and Pets (linear probe: train and test), each split
    in `shards` shards."""
    templates = json.loads((_clip_benchmark_data() / "en_zeroshot_classification_templates.json").read_text())
    classnames = json.loads((_clip_benchmark_data() / "en_classnames.json").read_text())
    rng = random.Random(seed)

    def webp(label: int) -> dict:
        return {"webp": _encode(_scene(rng, (32, 32)), "WEBP"), "cls": label}

    write_wds_suite(dataset_root / "wds_vtab-cifar10", "test", [webp(i % 10) for i in range(SUITE_SIZE)],
                    {"classnames.txt": "\n".join(CIFAR10) + "\n",
                     "zeroshot_classification_templates.txt": "\n".join(templates["cifar10"]) + "\n"}, shards)
    coco = [{"jpg": _encode(_scene(rng, (640, 480)), "JPEG", quality=90),
             "txt": "\n".join(f"caption {k} of picture {i}" for k in range(5))} for i in range(SUITE_SIZE)]
    write_wds_suite(dataset_root / "wds_mscoco_captions", "test", coco, {"dataset_type.txt": "retrieval\n"}, shards)
    pets = {"classnames.txt": "\n".join(classnames["pets"]) + "\n",
            "zeroshot_classification_templates.txt": "\n".join(templates["pets"]) + "\n"}
    for split in ("train", "test"):
        samples = [{"jpg": _encode(_scene(rng, (200, 150)), "JPEG"), "cls": i % 4} for i in range(SUITE_SIZE)]
        write_wds_suite(dataset_root / "wds_vtab-pets", split, samples, pets, shards)


def _clip_benchmark_data() -> Path:
    import clip_benchmark.datasets

    return Path(clip_benchmark.datasets.__file__).parent


def write_image_folder(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(_encode(_scene(rng, (500, 375)), "JPEG"))


def write_preflight_inputs(clone: Path, www: Path, port: int) -> dict:
    """Every input of the preflight study, at the paths studies/preflight.yaml (the paper's) names in `clone`; the
    caption list and its images under `www` (serve it at 127.0.0.1:`port`); `preflight-port.yaml` in `clone` points
    the study at that port. Returns what was planted."""
    from dinorankclip.config import load_params, resolve

    cfg = resolve(load_params([clone / "params.yaml", clone / "studies" / "preflight.yaml"]), "preflight")
    listed = write_caption_list(www, port)
    write_second_captions(clone / cfg["captions"]["file"], listed["urls"])
    write_teacher(clone / cfg["teacher"]["weights"]["path"])
    write_suites(clone / Path(cfg["evaluate"]["dataset_root"]).parent)
    write_image_folder(clone / cfg["finetune"]["data"]["path"])
    (clone / "preflight-port.yaml").write_text(yaml.safe_dump(
        {"studies": {"preflight": {"source": {"tsv": f"http://127.0.0.1:{port}/{LIST}",
                                              "validation_tsv": f"http://127.0.0.1:{port}/{VALIDATION_LIST}"},
                                   # the paper's download refuses loopback: the test's server is the one exception
                                   "data": {"allow": [f"127.0.0.1:{port}"]}}}}))
    return {"served": SERVED, "dead_links": DEAD, "malformed": MALFORMED, "rows": listed["rows"]}
