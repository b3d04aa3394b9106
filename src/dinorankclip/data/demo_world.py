"""Write the demo world to disk: images to serve over HTTP, a CC3M-layout caption list, and the eval suites.

Beside it, `synthetic_captions.tsv` gives every training image its complete scene description, keyed by URL: the
demo's stand-in for a captioner's synthetic captions (the captions stage joins it to the shards).
The caption list is planted with the faults a real CC3M download meets — dead links, files that are not
images, rows that are not (caption, url) pairs — at seeded positions, and `planted.json` records how many of
each, so the data stage's counts can be checked exactly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from dinorankclip.data import world as w
from dinorankclip.data.demo_suites import PROBE_SUITES, SUITES, Suite

log = logging.getLogger(__name__)
JPEG_QUALITY = 95
CLOSED_PORT = 1  # tcpmux: nothing listens there, so a link to it is refused at once
SYNTHETIC_CAPTIONS = "synthetic_captions.tsv"


def jpeg_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _corrupt_payloads(rng: random.Random, valid_jpeg: bytes) -> list[bytes]:
    """Bodies a crawler meets instead of an image; each one fails to decode."""
    return [
        bytes(rng.getrandbits(8) for _ in range(600)),  # noise
        b"",  # empty body
        valid_jpeg[:120],  # cut inside the JPEG header
        b"<html><body><h1>Image not available</h1></body></html>",  # an error page served as 200
    ]


def _malformed_rows(rng: random.Random, base: str) -> list[str]:
    return [
        "a caption without any url",
        f"\t{base}/train/missing-caption.jpg",
        f"a caption\twith three\t{base}/train/x.jpg",
        f"a caption with a bad url\tnot-a-url/{rng.randrange(10**6)}.jpg",
    ]


def write_eval_suite(suite: Suite, root: Path, image_size: int, split: str = "test") -> None:
    """One split of a suite in clip-benchmark's local webdataset layout (root = the suite's dataset_root)."""
    (root / split).mkdir(parents=True)
    with wds.TarWriter(str(root / split / "0.tar"), mtime=0) as sink:
        for i, (scene, target) in enumerate(suite.items):
            sample = {"__key__": f"s{i:07d}", "jpg": jpeg_bytes(w.render(scene, image_size))}
            if suite.task == "zeroshot_retrieval":
                sample["txt"] = "\n".join(target)
            else:
                sample["cls"] = target
            sink.write(sample)
    (root / split / "nshards.txt").write_text("1\n")
    if suite.task == "zeroshot_retrieval":
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(suite.classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(suite.templates) + "\n")


def write_demo_world(out: Path, spec: dict, seed: int) -> dict:
    """Generate the world under `out`; return the planted-fault counts (also written to planted.json)."""
    rng = random.Random(seed)
    size, base = spec["image_size"], f"http://127.0.0.1:{spec['port']}"
    www = out / "www"
    (www / "train").mkdir(parents=True)
    (www / "broken").mkdir()

    rows, scenes = [], []
    for i in tqdm(range(spec["train_scenes"]), desc="demo world: training scenes", mininterval=2):
        scene = w.sample_scene(rng)
        rel = f"train/{i:06d}.jpg"
        (www / rel).write_bytes(jpeg_bytes(w.render(scene, size)))
        caption = w.alt_text(scene, rng)
        rows.append(f"{caption}\t{base}/{rel}")
        scenes.append({"url": f"{base}/{rel}", "caption": caption, "description": w.full_description(scene),
                       **scene.to_dict()})

    payloads = _corrupt_payloads(rng, (www / "train" / "000000.jpg").read_bytes())
    faults = []
    for j in range(spec["corrupt_files"]):
        rel = f"broken/{j:03d}.jpg"
        (www / rel).write_bytes(payloads[j % len(payloads)])
        faults.append(f"a picture that will not decode\t{base}/{rel}")
    for j in range(spec["dead_links"]):
        host = base if j % 3 else f"http://127.0.0.1:{CLOSED_PORT}"  # 404s and refused connections
        faults.append(f"a picture that is gone\t{host}/gone/{j:03d}.jpg")
    malformed = (_malformed_rows(rng, base) * spec["malformed_rows"])[: spec["malformed_rows"]]
    for row in faults + malformed:
        rows.insert(rng.randrange(len(rows) + 1), row)

    (out / "raw.tsv").write_text("\n".join(rows) + "\n")
    # the second caption per image (the captions stage): what a captioner that saw everything would write
    (out / SYNTHETIC_CAPTIONS).write_text("url\tcaption\n" + "".join(f"{s['url']}\t{s['description']}\n"
                                                                     for s in scenes))
    with open(out / "scenes.jsonl", "w") as f:
        for scene in scenes:
            f.write(json.dumps(scene, sort_keys=True) + "\n")

    suite_rng = random.Random(seed + 1)
    for name, make in SUITES.items():
        size_key = "retrieval_size" if name == "demo-retrieval" else "eval_size"
        write_eval_suite(make(suite_rng, spec[size_key]), out / "eval" / f"wds_{name}", size)
    train_rng = random.Random(seed + 2)
    for name in PROBE_SUITES if spec["probe_train_size"] else ():
        write_eval_suite(SUITES[name](train_rng, spec["probe_train_size"]), out / "eval" / f"wds_{name}", size, "train")

    planted = {"train_images": spec["train_scenes"], "corrupt_files": spec["corrupt_files"],
               "dead_links": spec["dead_links"], "malformed_rows": spec["malformed_rows"]}
    (out / "planted.json").write_text(json.dumps(planted, indent=2, sort_keys=True) + "\n")
    log.info("demo world: %s under %s", planted, os.fspath(out))
    return planted
