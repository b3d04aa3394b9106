"""The evaluate stage's own analyses: the modality gap against a direct numpy computation, the linear probe against
scikit-learn and clip-benchmark's search, and the per-checkpoint feature cache; its loaders on splits with fewer
shards than workers, and the README's clip-benchmark command against the stage's JSON."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from dinorankclip.eval import linear_probe as lp
from dinorankclip.eval.features import cached_features
from dinorankclip.eval.modality_gap import gap_analysis


def numpy_gap(text, z, cls, z_g, fit_fraction):
    """The definitions of METHOD.md §7, written out directly in numpy (loops for the pairwise terms)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n_fit = round(len(text) * fit_fraction)
    text, z, cls = unit(text), unit(z), unit(cls)
    design = np.hstack([cls, np.ones((len(cls), 1))])
    weights = np.linalg.lstsq(design[:n_fit], text[:n_fit], rcond=None)[0]
    nodes = {"text": text, "z_g": unit(z_g), "z": z, "teacher": unit(design @ weights)}
    held = {k: v[n_fit:] for k, v in nodes.items()}
    centroids = {k: v.mean(axis=0) for k, v in held.items()}
    dist = [[float(np.sqrt(np.sum((centroids[a] - centroids[b]) ** 2))) for b in held] for a in held]

    def uniformity(x):
        pots = [np.exp(-2 * np.sum((x[i] - x[j]) ** 2)) for i in range(len(x)) for j in range(i + 1, len(x))]
        return float(np.log(np.mean(pots)))

    return {"dist": dist, "gap": float(np.linalg.norm(centroids["z"] - centroids["text"])),
            "alignment": float(np.mean([np.sum((a - b) ** 2) for a, b in zip(held["z"], held["text"], strict=True)])),
            "uniformity_image": uniformity(held["z"]), "uniformity_text": uniformity(held["text"])}


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    n, d = 60, 8
    text = rng.normal(size=(n, d)) + 1.5  # shifted: a real gap between the modalities
    z_g = rng.normal(size=(n, d))
    z = z_g + 0.1 * rng.normal(size=(n, d))
    cls = np.hstack([text, rng.normal(size=(n, 4))]) @ rng.normal(size=(d + 4, 12))  # a linear view of the text
    return text, z, cls, z_g


def test_modality_gap_numbers_equal_a_direct_numpy_computation(embeddings, single_thread):
    text, z, cls, z_g = embeddings
    got = gap_analysis(*(torch.from_numpy(x).float() for x in (text, z, cls, z_g)), fit_fraction=0.5)
    want = numpy_gap(*(torch.from_numpy(x).float().double().numpy() for x in (text, z, cls, z_g)), 0.5)
    assert got["nodes"] == ["text", "z_g", "z", "teacher"] and (got["fit_pairs"], got["pairs"]) == (30, 30)
    np.testing.assert_allclose(got["centroid_distances"], want["dist"], rtol=1e-9, atol=1e-12)
    for key in ("alignment", "uniformity_image", "uniformity_text"):
        assert got["metrics"][key] == pytest.approx(want[key], rel=1e-9), key
    assert got["metrics"]["centroid_gap"] == pytest.approx(want["gap"], rel=1e-9)
    assert got["metrics"]["centroid_gap"] == pytest.approx(got["centroid_distances"][0][2], rel=1e-12)
    # the teacher map reads the text well (cls is a linear view of it), the image towers are far off
    assert got["centroid_distances"][0][3] < 0.2 < 0.5 < got["centroid_distances"][0][2]


def test_modality_gap_without_injection_has_three_nodes_and_checks_its_split(embeddings):
    text, z, cls, _ = (torch.from_numpy(x).float() for x in embeddings)
    got = gap_analysis(text, z, cls, None, fit_fraction=0.25)
    assert got["nodes"] == ["text", "z", "teacher"] and len(got["centroid_distances"]) == 3
    assert (got["fit_pairs"], got["pairs"]) == (15, 45)
    with pytest.raises(ValueError, match="modality_gap.fit_fraction 0.99"):
        gap_analysis(text, z, cls, None, fit_fraction=0.99)


def blobs(n, centres, spread, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(centres)
    x = np.asarray(centres, dtype=float)[y] + spread * rng.normal(size=(n, len(centres[0])))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # the probe sees L2-normalised features
    return torch.from_numpy(x).float(), torch.from_numpy(y)


PROBE = {"lr": 0.1, "epochs": 10, "batch_size": 64, "val_proportion": 0.2}
CENTRES = [[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3], [-3, -3, 0, 0], [0, 0, -3, -3]]


def sklearn_predictions(train, test):
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(train[0].numpy(), train[1].numpy())
    return clf.predict(test[0].numpy())


def test_probe_matches_scikit_learn_on_a_separable_problem(single_thread):
    train, test = blobs(300, CENTRES, 0.3, seed=1), blobs(240, CENTRES, 0.3, seed=2)
    metrics = lp.linear_probe(*train, *test, PROBE, seed=0)
    model = lp.train_probe(*train, 6, metrics["weight_decay"], 0.1, 10, 64, seed=0)
    ours = lp.logits_of(model, test[0]).argmax(dim=1).numpy()
    assert (ours == sklearn_predictions(train, test)).all() and (ours == test[1].numpy()).all()
    assert metrics["lp_acc1"] == metrics["lp_acc5"] == metrics["lp_mean_per_class_recall"] == 1.0
    assert metrics["weight_decay"] in lp.WEIGHT_DECAYS and metrics["fewshot_k"] == -1 and metrics["normalized"]


def test_probe_is_as_good_as_scikit_learn_where_classes_overlap(single_thread):
    train, test = blobs(600, CENTRES[:4], 2.0, seed=3), blobs(800, CENTRES[:4], 2.0, seed=4)
    metrics = lp.linear_probe(*train, *test, PROBE, seed=0)
    reference = float((sklearn_predictions(train, test) == test[1].numpy()).mean())
    assert 0.4 < reference < 0.95  # the problem is hard enough to tell probes apart
    assert metrics["lp_acc1"] == pytest.approx(reference, abs=0.03)
    assert np.isnan(metrics["lp_acc5"])  # fewer than 6 classes: clip-benchmark reports no top-5


def test_weight_decay_search_is_clip_benchmarks_coarse_then_refined_peak(monkeypatch):
    assert lp.COARSE == list(range(0, 97, 16))
    tried = []

    def fake_train(x, y, classes, weight_decay, *args):
        tried.append(lp.WEIGHT_DECAYS.index(weight_decay))
        return weight_decay

    # validation accuracy peaks at grid index 37 and falls off on both sides
    monkeypatch.setattr(lp, "train_probe", fake_train)
    monkeypatch.setattr(lp, "logits_of", lambda wd, x: wd)
    monkeypatch.setattr(lp, "topk_accuracy", lambda wd, y, k: [1 - abs(lp.WEIGHT_DECAYS.index(wd) - 37) / 100])
    data = (torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    assert lp.search_weight_decay(data, data, 2, 0.1, 1, 4, 0) == lp.WEIGHT_DECAYS[37]
    assert tried[:7] == lp.COARSE  # coarse pass, then spans 8, 4, 2, 1 around the running peak (32)
    assert tried[7:] == [24, 32, 40, 36, 40, 44, 34, 36, 38, 35, 36, 37]  # 38 ties 36: no strict gain


def test_feature_cache_is_keyed_by_the_checkpoint_bytes(tmp_path):
    from dinorankclip.models.clip import create_clip, export_local_dir

    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    model_dir.mkdir()
    torch.manual_seed(0)
    export_local_dir(create_clip("demo-rn-tiny")[0], "demo-rn-tiny", model_dir)
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return torch.full((3, 2), float(value)), torch.arange(3)
        return run

    first = cached_features(cache, model_dir, "wds/x:train", compute(1))
    again = cached_features(cache, model_dir, "wds/x:train", compute(2))
    assert calls == [1] and torch.equal(first[0], again[0])  # same checkpoint: read back, not recomputed
    other_split = cached_features(cache, model_dir, "wds/x:test", compute(3))
    assert calls == [1, 3] and other_split[0][0, 0] == 3
    torch.manual_seed(1)
    for path in model_dir.iterdir():
        path.unlink()
    export_local_dir(create_clip("demo-rn-tiny")[0], "demo-rn-tiny", model_dir)  # the checkpoint changes in place
    fresh = cached_features(cache, model_dir, "wds/x:train", compute(4))
    assert calls == [1, 3, 4] and fresh[0][0, 0] == 4  # stale features are never read
    assert len(list(cache.glob("*.pt"))) == 3


def test_loader_workers_beyond_a_splits_shards_are_capped_at_its_shard_count(tmp_path, caplog, single_thread):
    """A suite exported as one shard, evaluated with 2 workers: webdataset would leave one worker without a shard
    and fail the run; the loader runs one worker instead and scores what 0 workers score."""
    import logging
    import random

    import open_clip

    from dinorankclip.data.demo_suites import colour_suite
    from dinorankclip.data.demo_world import write_eval_suite
    from dinorankclip.eval.suites import evaluate_suite
    from dinorankclip.models.clip import create_clip

    write_eval_suite(colour_suite(random.Random(0), 24), tmp_path / "wds_demo-colour", 64)
    torch.manual_seed(0)
    model, transform, _ = create_clip("demo-rn-tiny")
    model, tokenizer = model.eval(), open_clip.get_tokenizer("demo-rn-tiny")
    suite = {"dataset": "wds/demo-colour", "task": "zeroshot_classification"}
    ev = {"dataset_root": str(tmp_path / "wds_{dataset_cleaned}"), "batch_size": 8}
    with caplog.at_level(logging.INFO, logger="dinorankclip.eval.suites"):
        capped = evaluate_suite(model, transform, tokenizer, suite, ev | {"workers": 2}, "cpu")
    assert "wds/demo-colour test has 1 shard(s); 1 loader workers instead of evaluate.workers 2" in caplog.text
    assert capped == evaluate_suite(model, transform, tokenizer, suite, ev | {"workers": 0}, "cpu")


def test_the_readme_clip_benchmark_example_writes_the_evaluate_stages_json(tmp_path, monkeypatch):
    """The README's `model_type eval` command, run as written on an injected export and a retrieval suite at the
    README's paths, with the evaluate stage's precision on CPU (--no_amp), ks and batch size: it writes into the
    current directory exactly the JSON the evaluate stage writes (before, the default output named a directory
    that did not exist, and the JSON recorded clip-benchmark's default architecture)."""
    import json
    import os
    import random
    import subprocess
    import sys

    from helpers import repo_params

    from dinorankclip.config import resolve
    from dinorankclip.data.demo_suites import retrieval_suite
    from dinorankclip.data.demo_world import write_eval_suite
    from dinorankclip.eval.suites import evaluate_run
    from dinorankclip.models.clip import create_clip, export_local_dir
    from dinorankclip.tracking import NullTracker

    monkeypatch.chdir(tmp_path)
    cfg = resolve(repo_params(), "demo", "drc-r3")
    ev = cfg["evaluate"]
    ev["suites"] = [suite for suite in ev["suites"] if suite["dataset"] == "wds/demo-retrieval"]
    del ev["linear_probe"], ev["modality_gap"]
    write_eval_suite(retrieval_suite(random.Random(0), 30), Path("results/demo/source/eval/wds_demo-retrieval"), 64)
    model_dir = Path("results/demo/pretrain/drc-r3/seed0/model")
    model_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model, _, spec = create_clip(cfg["model"]["arch"], cfg["injection"], len(cfg["teacher"]["blocks"]))
    export_local_dir(model.eval(), cfg["model"]["arch"], model_dir, spec)

    command = ["-m", "dinorankclip.eval.model_type", "eval", "--model_type", "dinorankclip",
               "--pretrained", str(model_dir), "--dataset", "wds/demo-retrieval",
               "--dataset_root", "results/demo/source/eval/wds_demo-retrieval", "--task", "zeroshot_retrieval",
               "--num_workers", "0", "--no_amp", "--recall_k", "1", "5", "10", "--batch_size", str(ev["batch_size"])]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": str(ev["threads"])})
    assert done.returncode == 0, done.stderr[-3000:]
    written = "demo-retrieval_results_demo_pretrain_drc-r3_seed0_model_demo-rn-tiny_en_zeroshot_retrieval.json"
    cli = json.loads(Path(written).read_text())
    evaluate_run(cfg, model_dir, Path("pipeline"), NullTracker())
    assert cli == json.loads(Path("pipeline/demo-retrieval.json").read_text())
    assert cli["model"] == "demo-rn-tiny" and set(cli["metrics"]) == {f"{side}_retrieval_recall@{k}" for k in (1, 5, 10)
                                                                     for side in ("image", "text")}


def test_paired_embeddings_of_an_injected_model_give_z_and_z_g_from_one_pass(single_thread):
    """The gap analysis reads an injected tower's z (after the gate) and z_g (the tower's own) from `features`."""
    import torch.nn.functional as F

    from dinorankclip.eval.modality_gap import paired_embeddings
    from dinorankclip.models.clip import create_clip

    torch.manual_seed(0)
    injection = {"variant": "v5", "channels": 16, "taps": [0, 1, 2], "reduction": 4, "spatial_kernel": 3,
                 "heads": 2, "refiner_depth": 1, "max_grid": 4, "gate_bias": 0.0}
    model, _, _ = create_clip("demo-rn-tiny", injection, 3)
    model.eval()
    with torch.no_grad():
        model.visual.fusion.projection.weight.normal_(0, 0.5)  # a trained P: z moves away from z_g
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:4], [["a red circle"]] * 4), (images[4:], [["a blue square"]] * 2)]
    tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    out = paired_embeddings(model, lambda x: torch.randn(len(x), 8), loader, lambda t: tokens.expand(len(t), -1),
                            "cpu", limit=5)
    assert out["z"].shape == out["z_g"].shape == (5, model.visual.tower.output_dim)
    with torch.no_grad():
        features = model.visual.features(images[:5])
    torch.testing.assert_close(out["z_g"], features.z_g)
    torch.testing.assert_close(out["z"], features.z)
    assert not torch.allclose(F.normalize(out["z"], dim=-1), F.normalize(out["z_g"], dim=-1))
