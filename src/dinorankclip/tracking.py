"""MLflow: every job is a run in the study's experiment, with its resolved config, metrics and artifacts.

The default store is an embedded sqlite database under `results/<study>/` (mutable, so never a DVC output);
`MLFLOW_TRACKING_URI` points jobs at a server instead (what a shared cluster filesystem needs: sqlite's file
locks are not reliable there). Metrics are buffered and sent in batches, which keeps parallel jobs from contending
for the sqlite write lock on every step. Runs are keyed (`job_key`): a job that resumes its checkpoint continues its
run, a rerun of the same job replaces its run, and a job of other settings starts a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from dinorankclip.layout import seed_part

log = logging.getLogger(__name__)
FLUSH_SECONDS = 10.0
DRAIN_ATTEMPTS = 6  # at the end of a job: about a minute of retries before its metrics are given up as an error
SYSTEM_METRICS_SECONDS = 5.0
MAX_PARAM_LENGTH = 6000


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to strings, the shape MLflow params take."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def metric_name(key: str) -> str:
    """MLflow accepts alphanumerics and `_-. :/` in metric names; clip-benchmark's `recall@k` becomes `recall_at_k`."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """A thin handle on one active MLflow run.

    Metrics are buffered and sent in batches. A send that fails (a store locked past its timeout, a tracking server
    restarting) keeps them buffered for the next flush and logs a warning: a training job does not die, nor lose
    metrics, because the tracking store was away for a while. At the end of the job `drain` retries, then raises."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._buffer: list = []
        self._last_flush = time.monotonic()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def _send(self) -> None:
        while self._buffer:  # batch by batch: a failure part-way keeps exactly what was not sent
            self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
            del self._buffer[:1000]

    def flush(self) -> None:
        """Send the buffered metrics; if the store does not answer, keep them for the next flush."""
        self._last_flush = time.monotonic()
        try:
            self._send()
        except Exception as err:  # noqa: BLE001 - MLflow, HTTP and SQLAlchemy errors alike: try again later
            log.warning("MLflow: %d metrics not sent yet (%s: %s); trying again at the next flush", len(self._buffer),
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def drain(self, attempts: int = DRAIN_ATTEMPTS) -> None:
        """Send everything still buffered, waiting 2, 4, 8, ... s between attempts; raise the last error."""
        for attempt in range(attempts):
            try:
                self._send()
                return
            except Exception:  # noqa: BLE001
                if attempt == attempts - 1:
                    raise
                time.sleep(2 ** (attempt + 1))

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


class NullTracker:
    """What ranks other than 0 of a torchrun job log to: nothing (rank 0 speaks for the job)."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


def tracking_uri(study_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


STUDY_ROLE_TAG = "dinorankclip.role"


def _experiment(client, name: str, study_dir: Path) -> str:
    """The id of the study's experiment, created on first use. The file lock around this serialises the jobs of
    one machine; jobs of several machines on one tracking server can still race, and the loser reads the winner's."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(study_dir.resolve() / "mlartifacts").as_uri())
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _study_parent(client, experiment_id: str, study: str) -> str:
    """The id of the study's parent run (created once): every job's run is its child in the MLflow UI."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_ROLE_TAG}` = 'study'", max_results=1)
    if found:
        return found[0].info.run_id
    parent = client.create_run(experiment_id, run_name=f"study/{study}",
                               tags={STUDY_ROLE_TAG: "study", "study": study, "mlflow.runName": f"study/{study}"})
    client.set_terminated(parent.info.run_id, status="FINISHED")
    return parent.info.run_id


KEY_TAG = "dinorankclip.key"
REPLACED_TAG = "dinorankclip.replaced_by"
STUDY_DIR_TAG = "dinorankclip.study_dir"  # which checkout's results a run describes, on a store several share


def job_key(study_dir: Path, stage: str, config: Mapping[str, Any], fingerprint: str | None = None) -> str:
    """What identifies a job's MLflow run: the stage and the fingerprint of what the job computes (a training's
    checkpoint fingerprint; else its resolved config), and, on a store several checkouts may share
    (MLFLOW_TRACKING_URI), the study folder. A rerun with the same key stands for the same job; a change of settings
    gets a new key and a new run. The study's own sqlite store moves with its folder, so there the folder is left
    out: a copied or moved study still finds its runs."""
    what = fingerprint if fingerprint is not None else json.dumps(config, sort_keys=True, default=str)
    scope = str(study_dir.resolve()) if os.environ.get("MLFLOW_TRACKING_URI") else ""
    return hashlib.sha256(json.dumps([scope, stage, what]).encode()).hexdigest()


def _runs_of(client, experiment_id: str, key: str) -> list:
    """The live (not deleted) runs carrying `key`, newest first."""
    from mlflow.entities import ViewType

    return client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"])


@contextlib.contextmanager
def job_run(config: Mapping[str, Any], study_dir: Path, stage: str, key: str | None = None,
            resume: bool = False) -> Iterator[Tracker]:
    """An MLflow run named `<stage>/<run>/seed<k>` (or `<stage>`) in experiment `dinorankclip/<study>`, a child of
    the study's parent run, with system metrics sampled alongside; FAILED if the job raises.

    Runs are keyed (`key`, default `job_key` of the config): with `resume` (a training that continues from its
    checkpoint) the newest run of the key is continued; otherwise a new run starts, and older runs of the same key
    (the same job run again: a forced rerun, a retrained checkpoint) are deleted - MLflow keeps them in its trash,
    tagged with the run that replaced them - so one live run stands for each job and setting.
    """
    from mlflow.entities import Param
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    study_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(study_dir)
    key = key or job_key(study_dir, stage, config)
    experiment_name = f"dinorankclip/{config['study']}"
    with FileLock(str(study_dir / ".mlflow.lock")):  # one job creates the schema, the experiment and the parent
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment(client, experiment_name, study_dir)
        parent_id = _study_parent(client, experiment_id, config["study"])
    name = f"{stage}/{config['run']}/{seed_part(config['seed'])}" if "run" in config else stage
    earlier = _runs_of(client, experiment_id, key)
    continued = resume and bool(earlier)
    if continued:
        run, earlier = earlier[0], earlier[1:]
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, "resumed", "true")
    else:
        tags = {"stage": stage, "study": config["study"], "git_commit": _git_commit(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "mlflow.runName": name,
                "mlflow.parentRunId": parent_id, KEY_TAG: key, STUDY_DIR_TAG: str(study_dir.resolve())}
        if "run" in config:
            tags.update(run=config["run"], seed=str(config["seed"]))
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100])
    for old in earlier:
        client.set_tag(old.info.run_id, REPLACED_TAG, run.info.run_id)
        client.delete_run(old.info.run_id)
        log.info("MLflow run %s (%s) replaced by %s", name, old.info.run_id, run.info.run_id)
    tracker = Tracker(client, run.info.run_id)
    monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=SYSTEM_METRICS_SECONDS,
                                   resume_logging=continued, tracking_uri=uri)
    monitor.start()
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as stop:
        if getattr(stop, "resumable", False):  # preempted: a rerun continues this run
            status = "KILLED"
        raise
    finally:
        try:
            monitor.finish()
            tracker.drain()
        finally:
            client.set_terminated(run.info.run_id, status=status)
    log.info("MLflow run %s (%s) in %s", name, run.info.run_id, uri)
