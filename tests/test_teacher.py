"""The teacher stage: weights handling, features keyed like the images, coverage check, per-shard resume."""

import io
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import repo_params
from PIL import Image

from dinorankclip.config import resolve
from dinorankclip.data import features, world
from dinorankclip.data.demo_world import jpeg_bytes
from dinorankclip.io import read_json, write_json
from dinorankclip.models.teacher import load_teacher, teacher_features, teacher_transform


def make_image_shards(data_dir, counts):
    """Shards of demo scenes under data_dir/shards with a wids index, like the data stage writes."""
    rng = random.Random(0)
    (data_dir / "shards").mkdir(parents=True)
    entries, images = [], {}
    for s, n in enumerate(counts):
        with wds.TarWriter(str(data_dir / "shards" / f"{s:05d}.tar"), mtime=0) as sink:
            for i in range(n):
                key, jpeg = f"{s:05d}{i:04d}", jpeg_bytes(world.render(world.sample_scene(rng), 64))
                images[key] = Image.open(io.BytesIO(jpeg)).convert("RGB")  # what the stage decodes
                sink.write({"__key__": key, "jpg": jpeg, "txt": "a caption"})
        entries.append({"url": f"shards/{s:05d}.tar", "nsamples": n})
    write_json(data_dir / "shards.json", {"shardlist": entries})
    return images


@pytest.fixture
def cfg():
    cfg = resolve(repo_params(), "demo")
    cfg["teacher"].update(batch_size=4, threads=1)
    return cfg


def test_missing_weights_file_is_one_error_saying_where_to_put_it(cfg, tmp_path):
    cfg["teacher"].update(init="file", weights=str(tmp_path / "dinov3.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"teacher.weights: DINOv3 weights file .*dinov3\.safetensors' not"):
        load_teacher(cfg["teacher"], torch.device("cpu"))


def test_weights_file_is_loaded(cfg, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = load_teacher(cfg["teacher"], torch.device("cpu"))
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    cfg["teacher"].update(init="file", weights=str(tmp_path / "w.safetensors"))
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = load_teacher(cfg["teacher"], torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reference.forward_features(x), loaded.forward_features(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


@pytest.fixture
def cached(cfg, tmp_path):
    images = make_image_shards(tmp_path / "data", [5, 3])
    (tmp_path / "teacher").mkdir()
    stats = features.build_feature_cache(cfg, tmp_path / "data", tmp_path / "staging", tmp_path / "teacher")
    return images, stats, tmp_path


def read_features(shard):
    out = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, kind = m.name.split(".", 1)
            out.setdefault(key, {})[kind] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return out


def test_cache_holds_the_teacher_features_of_each_key(cfg, cached):
    images, stats, root = cached
    assert stats["images"] == 8 and stats["shards"] == 2 and stats["bytes_per_image"] > 0
    cache = {**read_features(root / "teacher/features/00000.tar"), **read_features(root / "teacher/features/00001.tar")}
    assert set(cache) == set(images)
    torch.manual_seed(cfg["seed"])
    model = load_teacher(cfg["teacher"], torch.device("cpu"))
    transform = teacher_transform(32)
    for key in ("000000003", "000010001"):
        cls, patches = teacher_features(model, transform(images[key])[None], cfg["teacher"]["blocks"], 2)
        assert cache[key]["cls.npy"].dtype == np.float16 and cache[key]["patches.npy"].shape == (3, 192, 2, 2)
        np.testing.assert_allclose(cache[key]["cls.npy"], cls[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(cache[key]["patches.npy"], patches[0].numpy(), rtol=2e-3, atol=2e-3)
    assert read_json(root / "teacher/features.json")["shardlist"][1] == {"url": "features/00001.tar", "nsamples": 3}


def test_coverage_check_names_missing_and_extra_keys(cached, tmp_path):
    _, _, root = cached
    image_shard, feature_shard = root / "data/shards/00001.tar", root / "teacher/features/00001.tar"
    planted = tmp_path / "planted.tar"
    with tarfile.open(feature_shard) as src, tarfile.open(planted, "w") as dst:
        for m in src:
            if not m.name.startswith("000010002."):  # drop one key
                dst.addfile(m, src.extractfile(m))
        extra = next(m for m in tarfile.open(feature_shard) if m.name.endswith(".cls.npy"))
        extra.name = "999999999.cls.npy"
        dst.addfile(extra, tarfile.open(feature_shard).extractfile(extra.name.replace("999999999", "000010000")))
    with pytest.raises(ValueError) as err:
        features.coverage([image_shard], [planted])
    assert "no features for ['000010002']" in str(err.value) and "unknown keys ['999999999']" in str(err.value)


def test_killed_job_resumes_without_recomputing_finished_shards(cfg, cached, monkeypatch):
    _, _, root = cached
    first = {p.name: p.read_bytes() for p in (root / "teacher/features").iterdir()}
    # a previous attempt finished shard 00000, then died: its staging holds that shard and the fingerprint
    staging = root / "staging2"
    staging.mkdir()
    shutil.copy(root / "teacher/features/00000.tar", staging / "00000.tar")
    stamp = features.fingerprint([root / "data/shards.json"], {"teacher": cfg["teacher"], "arch": cfg["model"]})
    (staging / "FINGERPRINT").write_text(stamp)
    computed = []
    original = features.cache_shard

    def counting(model, shard, *args):
        computed.append(shard.name)
        return original(model, shard, *args)

    monkeypatch.setattr(features, "cache_shard", counting)
    (root / "teacher2").mkdir()
    features.build_feature_cache(cfg, root / "data", staging, root / "teacher2")
    assert computed == ["00001.tar"]
    assert {p.name: p.read_bytes() for p in (root / "teacher2/features").iterdir()} == first
