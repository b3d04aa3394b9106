"""MLflow under load (issue 20): eight jobs writing to the study's sqlite store at the same moment lose nothing,
and a study sends its runs to a tracking server when MLFLOW_TRACKING_URI names one."""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

JOBS, STEPS, FLUSH_EVERY = 8, 600, 50


def job(study: str, index: int, barrier, uri: str | None) -> None:
    """One job of the study: a run with params, a metric per step flushed in batches as training does, tags and an
    artifact; all eight start together."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    from dinorankclip.tracking import job_run

    cfg = {"study": "demo", "run": f"run-{index}", "seed": 0, "pretrain": {"lr": 0.1 * index, "batch": 64}}
    artifact = Path(study) / f"artifact-{index}.json"
    artifact.write_text(f'{{"job": {index}}}')
    barrier.wait()
    with job_run(cfg, Path(study), "pretrain") as tracker:
        for step in range(1, STEPS + 1):
            tracker.log_metrics({"loss": index + 1 / step, "lr": 0.1 * index}, step)
            if step % FLUSH_EVERY == 0:
                tracker.flush()
        tracker.set_tags({"job": str(index)})
        tracker.log_artifact(artifact)


def run_jobs(study: Path, uri: str | None = None) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(JOBS)
    processes = [context.Process(target=job, args=(str(study), i, barrier, uri)) for i in range(JOBS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=900)
    assert [p.exitcode for p in processes] == [0] * JOBS


def check_store(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dinorankclip/demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted([f"pretrain/run-{i}/seed0" for i in range(JOBS)] + ["study/demo"])
    for i in range(JOBS):
        run = runs[f"pretrain/run-{i}/seed0"]
        assert run.info.status == "FINISHED" and run.data.tags["job"] == str(i)
        assert run.data.params["pretrain.lr"] == str(0.1 * i)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, i + 1 / s) for s in range(1, STEPS + 1)]
        assert len(client.get_metric_history(run.info.run_id, "lr")) == STEPS
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"artifact-{i}.json"]


@pytest.mark.e2e
def test_eight_jobs_writing_to_the_sqlite_store_at_once_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "results/demo"
    study.mkdir(parents=True)
    run_jobs(study)
    check_store(f"sqlite:///{study / 'mlflow.db'}")


@pytest.mark.e2e
def test_a_study_sends_its_runs_to_the_tracking_server_named_by_mlflow_tracking_uri(tmp_path, monkeypatch):
    """`mlflow server` with its own store (what a shared cluster filesystem needs instead of one sqlite file):
    the jobs write through HTTP, and the study folder gets no mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{server_dir / 'store.db'}",
         "--artifacts-destination", str(server_dir / "artifacts"), "--workers", "1"],
        cwd=server_dir, stdout=subprocess.DEVNULL, stderr=open(server_dir / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (server_dir / "server.log").read_text()[-3000:]
                time.sleep(1)
        study = tmp_path / "results/demo"
        study.mkdir(parents=True)
        run_jobs(study, uri)
        check_store(uri)
        assert not (study / "mlflow.db").exists()
    finally:
        server.terminate()
        server.wait(timeout=60)


class FlakyStore:
    """A tracking client whose first `failures` log_batch calls fail, as a locked or restarting store does."""

    def __init__(self, failures: int):
        self.failures, self.sent = failures, []

    def log_batch(self, run_id, metrics):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("tracking server unreachable")
        self.sent += [(m.key, m.step) for m in metrics]


def test_metrics_a_store_refused_are_kept_and_sent_later_exactly_once(monkeypatch, caplog):
    from dinorankclip import tracking

    store = FlakyStore(failures=2)
    tracker = tracking.Tracker(store, "run")
    for step in range(1, 1501):  # two batches of 1000 and 500
        tracker.log_metrics({"loss": 1 / step}, step)
    tracker.flush()  # fails: kept
    assert store.sent == [] and "1500 metrics not sent yet (ConnectionError" in caplog.text
    tracker.log_metrics({"loss": 0.0}, 1501)
    tracker.flush()  # fails again: still kept, nothing raised into the training loop
    sleeps = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    tracker.drain()
    assert store.sent == [("loss", step) for step in range(1, 1502)] and sleeps == []


def test_a_store_that_never_answers_fails_the_job_at_its_end(monkeypatch):
    from dinorankclip import tracking

    tracker = tracking.Tracker(FlakyStore(failures=10), "run")
    tracker.log_metrics({"loss": 1.0}, 1)
    sleeps = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    with pytest.raises(ConnectionError):
        tracker.drain(attempts=3)
    assert sleeps == [2, 4]
