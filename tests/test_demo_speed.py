"""The demo's per-job costs: the in-memory training pairs (bit for bit the streamed ones and open_clip's transform
of each PIL image), the size budget that keeps the paper path streaming, the start-up line every job logs, and
bench/demo_cost.py's table from Snakemake benchmark files."""

import logging
import subprocess
import sys

import open_clip
import pytest
import torch
from helpers import make_image_shards, repo_params, write_features
from safetensors.torch import load_file

from dinorankclip import cli
from dinorankclip.config import resolve
from dinorankclip.data.captions import build_captions
from dinorankclip.data.loader import ShardPairs
from dinorankclip.models.clip import create_clip
from dinorankclip.tracking import NullTracker
from dinorankclip.train import pretrain

pytestmark = pytest.mark.usefixtures("single_thread")
COUNTS = [7, 5]
KEYS = {"00000.tar": [f"00000{i:04d}" for i in range(COUNTS[0])],
        "00001.tar": [f"00001{i:04d}" for i in range(COUNTS[1])]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Image shards with the PIL image each sample decodes to, a teacher cache and second captions."""
    root = tmp_path_factory.mktemp("pairs")
    images = make_image_shards(root / "data", COUNTS)
    features = write_features(root / "teacher", KEYS)
    (root / "captions").mkdir()
    file = root / "synthetic.tsv"
    file.write_text("key\tcaption\n" + "".join(f"{k}\tthe scene {k}, described\n" for k in images if int(k) % 3))
    build_captions({"study": "demo", "captions": {"file": str(file)}}, root / "data", root / "captions")
    return root, images, features, root / "captions" / "captions.json"


@pytest.fixture(scope="module")
def towers():
    _, transform, _ = create_clip("demo-rn-tiny")
    return transform, open_clip.get_tokenizer("demo-rn-tiny")


def pairs(inputs, towers, cache_mb, teacher=True, captions=True):
    root, _, features, second = inputs
    return ShardPairs(root / "data" / "shards.json", *towers, features if teacher else None,
                      second if captions else None, cache_mb)


def test_a_cached_batch_is_the_transform_of_each_pil_image_bit_for_bit(inputs, towers):
    _, images, _, _ = inputs
    transform, tokenizer = towers
    cached = pairs(inputs, towers, 64)
    assert cached.cache is not None and cached.cache.pixels.dtype == torch.uint8
    assert tuple(cached.cache.pixels.shape) == (sum(COUNTS), 32, 32, 3)  # the demo tower's 32x32 crop of 64x64
    batch = cached.__getitems__([9, 0, 4, 11])
    assert batch.keys == ["000010002", "000000000", "000000004", "000010004"]
    expected = torch.stack([transform(images[key]) for key in batch.keys])
    assert batch.images.dtype == expected.dtype and torch.equal(batch.images, expected)
    assert torch.equal(batch.tokens, tokenizer([f"a caption of {key}" for key in batch.keys]))
    second = [f"the scene {k}, described" if int(k) % 3 else f"a caption of {k}" for k in batch.keys]
    assert torch.equal(batch.captions, tokenizer(second))
    assert torch.equal(batch.teacher[:, 0, 0, 0, 0], torch.tensor([int(k) / 1e9 for k in batch.keys],
                                                                   dtype=torch.float16))


@pytest.mark.parametrize("teacher,captions", [(True, True), (False, False)])
def test_every_batch_of_an_epoch_equals_the_streamed_one(inputs, towers, teacher, captions):
    streamed, cached = (pairs(inputs, towers, mb, teacher, captions) for mb in (0, 64))
    assert streamed.cache is None and cached.cache is not None
    order = torch.randperm(len(streamed), generator=torch.Generator().manual_seed(3)).tolist()
    for start in range(0, len(order), 4):
        a, b = streamed.__getitems__(order[start:start + 4]), cached.__getitems__(order[start:start + 4])
        assert a.keys == b.keys
        assert (b.teacher is not None, b.captions is not None) == (teacher, captions)
        for x, y in zip(a[:2] + a[3:], b[:2] + b[3:], strict=True):  # every tensor field of the Batch
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))


def test_pairs_over_the_budget_stream(inputs, towers, caplog):
    # per sample: 32x32x3 uint8 pixels, two rows of 24 int64 token ids, 3x8x2x2 fp16 teacher maps
    need_mb = sum(COUNTS) * (32 * 32 * 3 + 2 * 24 * 8 + 3 * 8 * 2 * 2 * 2) / 2**20
    with caplog.at_level(logging.INFO, logger="dinorankclip.data.loader"):
        assert pairs(inputs, towers, need_mb * 0.999).cache is None
    assert "streamed from the shards" in caplog.text
    assert pairs(inputs, towers, need_mb).cache is not None


def test_a_transform_that_cannot_be_cached_exactly_names_the_key(inputs, towers):
    transform, tokenizer = towers
    steps = transform.transforms
    for odd in (type(transform)(steps[:-1]), type(transform)(steps[:-1] + [lambda x: x * 2, steps[-1]]), str):
        with pytest.raises(ValueError, match=r"(?s)pretrain.sample_cache_mb: the image transform .* does not end in "
                                             r"ToTensor \+ Normalize"):
            pairs(inputs, (odd, tokenizer), 64)


def test_pretraining_on_cached_pairs_ends_on_the_same_weights(inputs, tmp_path):
    root = inputs[0]
    weights = {}
    for mb in (0, 64):
        cfg = resolve(repo_params(), "demo", "drc-r3")
        cfg["pretrain"].update(epochs=1, batch_size=4, val_samples=4, checkpoint_every=0, log_every=1, threads=1,
                               warmup_steps=1, sample_cache_mb=mb)
        out = tmp_path / f"cache{mb}"
        out.mkdir()
        pretrain.pretrain(cfg, root / "data", {"teacher": root / "teacher", "captions": root / "captions"}, out,
                          NullTracker(), tmp_path / "state" / f"cache{mb}")
        weights[mb] = load_file(out / "model" / "open_clip_model.safetensors")
    assert weights[0].keys() == weights[64].keys()
    assert all(torch.equal(weights[0][k], weights[64][k]) for k in weights[0])


def test_the_start_up_line_states_the_seconds_since_the_process_started():
    code = ("import logging, time; from dinorankclip import cli; time.sleep(1.5); "
            "logging.basicConfig(level=logging.INFO, format='%(message)s'); cli.log_startup()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    found = cli.STARTUP.search(done.stderr)
    assert found, done.stderr
    assert 1.5 <= float(found["wall"]) < 60
    assert 0 < float(found["cpu"]) < float(found["wall"])  # sleeping costs no CPU
