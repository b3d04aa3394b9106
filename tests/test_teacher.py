"""The teacher stage: weights handling, features keyed like the images, coverage check, per-shard resume."""

import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
from helpers import make_image_shards, repo_params
from PIL import Image
from safetensors.torch import save_file

from dinorankclip.config import resolve
from dinorankclip.data import features
from dinorankclip.io import read_json
from dinorankclip.models.teacher import (
    WEIGHTS_FILE,
    OnlineTeacher,
    build_teacher_weights,
    create_teacher,
    load_teacher,
    teacher_features,
    teacher_transform,
)


@pytest.fixture
def cfg():
    cfg = resolve(repo_params(), "demo")
    cfg["teacher"].update(batch_size=4, threads=1)
    return cfg


@pytest.fixture
def weights_dir(cfg, tmp_path):
    """A teacher_weights stage output holding a seeded random teacher, as the paper study's file import writes it."""
    torch.manual_seed(1)
    save_file(create_teacher(cfg["teacher"]).state_dict(), str(tmp_path / "dinov3.safetensors"))
    cfg["teacher"]["weights"] = {"from": "file", "path": str(tmp_path / "dinov3.safetensors")}
    (tmp_path / "teacher_weights").mkdir()
    stats = build_teacher_weights(cfg, tmp_path / "source", tmp_path / "data", tmp_path / "teacher_weights")
    assert stats["from"] == "file" and len(stats["sha256"]) == 64
    return tmp_path / "teacher_weights"


def test_missing_weights_file_is_one_error_saying_where_to_put_it(cfg, tmp_path):
    cfg["teacher"]["weights"] = {"from": "file", "path": str(tmp_path / "dinov3.safetensors")}
    with pytest.raises(FileNotFoundError, match=r"teacher.weights.path: DINOv3 weights file .*dinov3\.safetensors' "
                                                r"not found.*put it at that path"):
        build_teacher_weights(cfg, tmp_path, tmp_path, tmp_path)


def test_weights_file_is_loaded_frozen(cfg, weights_dir):
    torch.manual_seed(1)
    reference = create_teacher(cfg["teacher"])
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = load_teacher(cfg["teacher"], weights_dir / WEIGHTS_FILE, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reference.eval().forward_features(x), loaded.forward_features(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_online_teacher_sees_what_the_cache_stage_shows_it(cfg, weights_dir):
    """Student-normalised images, renormalised online, give the maps of the teacher's own transform."""
    from torchvision import transforms

    model = load_teacher(cfg["teacher"], weights_dir / WEIGHTS_FILE, torch.device("cpu"))
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    online = OnlineTeacher(model, cfg["teacher"]["blocks"], 2, clip_mean, clip_std).train()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    student_view = transforms.Compose([transforms.ToTensor(), transforms.Normalize(clip_mean, clip_std)])(image)
    _, expected = teacher_features(model, teacher_transform(32)(image)[None], cfg["teacher"]["blocks"], 2)
    torch.testing.assert_close(online(student_view[None]), expected, rtol=1e-4, atol=1e-4)
    assert not online.training and not any(p.requires_grad for p in online.parameters())


@pytest.fixture
def cached(cfg, weights_dir, tmp_path):
    images = make_image_shards(tmp_path / "data", [5, 3])
    (tmp_path / "teacher").mkdir()
    stats, _ = features.build_feature_cache(cfg, tmp_path / "data", weights_dir, tmp_path / "staging",
                                            tmp_path / "teacher")
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
    model = load_teacher(cfg["teacher"], root / "teacher_weights" / WEIGHTS_FILE, torch.device("cpu"))
    transform = teacher_transform(32)
    for key in ("000000003", "000010001"):
        cls, patches = teacher_features(model, transform(images[key])[None], cfg["teacher"]["blocks"], 2)
        assert cache[key]["cls.npy"].dtype == np.float16 and cache[key]["patches.npy"].shape == (3, 96, 2, 2)
        np.testing.assert_allclose(cache[key]["cls.npy"], cls[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(cache[key]["patches.npy"], patches[0].numpy(), rtol=2e-3, atol=2e-3)
    assert read_json(root / "teacher/features.json")["shardlist"][1] == {
        "url": "features/00001.tar", "nsamples": 3, "filesize": (root / "teacher/features/00001.tar").stat().st_size}


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
    stamp = features.fingerprint([root / "data/shards.json", root / "teacher_weights" / WEIGHTS_FILE],
                                 {"teacher": cfg["teacher"], "arch": cfg["model"]})
    (staging / "FINGERPRINT").write_text(stamp)
    computed = []
    original = features.cache_shard

    def counting(model, shard, *args):
        computed.append(shard.name)
        return original(model, shard, *args)

    monkeypatch.setattr(features, "cache_shard", counting)
    (root / "teacher2").mkdir()
    _, timings = features.build_feature_cache(cfg, root / "data", root / "teacher_weights", staging, root / "teacher2")
    assert computed == ["00001.tar"] and timings["images_resumed"] == 5 and timings["images_computed"] == 3
    assert {p.name: p.read_bytes() for p in (root / "teacher2/features").iterdir()} == first
    # the output holds hard links of the staged work: a job killed before its output was published resumes with
    # every shard (the teacher stage removes the staging once the output is published)
    computed.clear()
    (root / "teacher3").mkdir()
    _, timings = features.build_feature_cache(cfg, root / "data", root / "teacher_weights", staging, root / "teacher3")
    assert computed == [] and timings["images_resumed"] == 8 and timings["images_computed"] == 0
    assert {p.name: p.read_bytes() for p in (root / "teacher3/features").iterdir()} == first


def test_pca_keeps_the_top_principal_directions_of_each_block(cfg, weights_dir, tmp_path):
    """With pca_dim below the width, the cache holds the projection on the top components: the variance it keeps
    equals the sum of the top eigenvalues of the sample covariance, block by block."""
    images = make_image_shards(tmp_path / "data", [6])
    cfg["teacher"].update(pca_dim=4, pca_sample=6)
    (tmp_path / "teacher").mkdir()
    stats, _ = features.build_feature_cache(cfg, tmp_path / "data", weights_dir, tmp_path / "staging",
                                            tmp_path / "teacher")
    assert stats["patch_channels"] == 4
    cache = read_features(tmp_path / "teacher/features/00000.tar")
    model = load_teacher(cfg["teacher"], weights_dir / WEIGHTS_FILE, torch.device("cpu"))
    batch = torch.stack([teacher_transform(32)(images[key]) for key in sorted(images)])
    _, maps = teacher_features(model, batch, cfg["teacher"]["blocks"], 2)  # [6, 3, 96, 2, 2]
    for block in range(3):
        vectors = maps[:, block].permute(0, 2, 3, 1).reshape(-1, 96).double()
        top = torch.linalg.eigvalsh(torch.cov(vectors.T, correction=0)).flip(0)[:4]
        kept = np.stack([cache[key]["patches.npy"][block] for key in sorted(images)]).astype(np.float64)
        kept = kept.transpose(0, 2, 3, 1).reshape(-1, 4)
        np.testing.assert_allclose(kept.var(axis=0).sum(), top.sum().item(), rtol=2e-2)
        np.testing.assert_allclose(kept.mean(axis=0), 0, atol=2e-2 * np.sqrt(top[0].item()))
