"""Atomic outputs, resumable staging, and MLflow runs in the study's sqlite store."""

import pytest

from dinorankclip.io import atomic_dir, prepare_staging
from dinorankclip.tracking import flatten, job_run, metric_name


def test_atomic_dir_replaces_on_success_and_keeps_the_old_output_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_staging_is_kept_for_the_same_inputs_and_wiped_for_others(tmp_path):
    staging = tmp_path / "staging"
    prepare_staging(staging, "abc")
    (staging / "done.tar").write_text("work")
    prepare_staging(staging, "abc")
    assert (staging / "done.tar").exists()
    prepare_staging(staging, "other")
    assert not (staging / "done.tar").exists() and (staging / "FINGERPRINT").read_text() == "other"


def test_metric_names_and_params_fit_mlflow():
    assert metric_name("demo-retrieval/image_retrieval_recall@1") == "demo-retrieval/image_retrieval_recall_at_1"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "{}"}


def test_job_run_records_params_metrics_artifacts_and_failure(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = {"study": "demo", "run": "clip", "seed": 0, "pretrain": {"lr": 0.1}}
    (tmp_path / "art.json").write_text("{}")
    with job_run(cfg, tmp_path / "results/demo", "pretrain") as tracker:
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.log_artifact(tmp_path / "art.json")
    with pytest.raises(ValueError), job_run(cfg, tmp_path / "results/demo", "evaluate"):
        raise ValueError("boom")
    client = MlflowClient(f"sqlite:///{tmp_path / 'results/demo/mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("dinorankclip/demo")
                                                            .experiment_id])}
    assert runs["pretrain/clip/seed0"].info.status == "FINISHED" and runs["evaluate/clip/seed0"].info.status == "FAILED"
    assert runs["pretrain/clip/seed0"].data.params["pretrain.lr"] == "0.1"
    assert runs["pretrain/clip/seed0"].data.tags["run"] == "clip"
    history = client.get_metric_history(runs["pretrain/clip/seed0"].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [a.path for a in client.list_artifacts(runs["pretrain/clip/seed0"].info.run_id)] == ["art.json"]


def test_jobs_are_children_of_one_study_run_and_a_resumed_job_continues_its_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dinorankclip.train.preemption import Preempted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "results/demo"
    cfg = {"study": "demo", "run": "clip", "seed": 0}
    with pytest.raises(Preempted), job_run(cfg, study, "pretrain", "fingerprint-1") as first:
        first.log_metrics({"loss": 2.0}, 1)
        raise Preempted("signal")
    with job_run(cfg, study, "pretrain", "fingerprint-1", resume=True) as second:
        second.log_metrics({"loss": 1.0}, 2)
    with job_run(cfg, study, "evaluate"):
        pass
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dinorankclip/demo").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["evaluate/clip/seed0", "pretrain/clip/seed0", "study/demo"] and len(runs) == 3
    parent = by_name["study/demo"].info.run_id
    assert all(by_name[n].data.tags["mlflow.parentRunId"] == parent
               for n in ("pretrain/clip/seed0", "evaluate/clip/seed0"))
    resumed = by_name["pretrain/clip/seed0"]
    assert second.run_id == first.run_id == resumed.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed"] == "true"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
