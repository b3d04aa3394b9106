"""Training jobs under real faults (issue 20, items 3 and 8), through the `dinorankclip pretrain` command: a job
killed with SIGKILL at a named kill point (`dinorankclip.faults`), a rerun after a params change, a truncated
`latest.pt`, a truncated image shard and a feature shard missing its last key.

Before: a rerun after a params change reopened the finished MLflow run (old lr logged, tagged resumed, two
settings' loss histories in one run); a truncated latest.pt failed every retry the same way; a truncated shard
and a short feature shard ended in IndexErrors from wids, the latter after some steps of training."""

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import make_image_shards, only_runs, repo_params, venv_env, write_features

from dinorankclip.train import checkpoint

pytestmark = pytest.mark.e2e  # real jobs in subprocesses: minutes

STATE = "results/demo/state/pretrain/clip/seed0"
KILL = "checkpoint:latest.pt"  # the job dies right after writing a checkpoint
# 64 pairs: 8 held out, 56 in batches of 16 -> 3 steps per epoch; checkpoints at steps 2, 3 (epoch end), 4, 6, 6
SMALL = {"epochs": 2, "batch_size": 16, "val_samples": 8, "checkpoint_every": 2, "log_every": 1, "threads": 1,
         "warmup_steps": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module's projects (creating its schema takes tens of seconds); runs of different
    projects have different keys (the key includes the study folder)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_project(root: Path, run: str = "clip", **pretrain) -> Path:
    params = repo_params()
    demo = params["studies"]["demo"]
    only_runs(demo, [run], {})
    demo["pretrain"].update(SMALL, **pretrain)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_image_shards(root / "results/demo/data", [40, 24])
    return root


def set_lr(project: Path, lr: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["studies"]["demo"]["pretrain"]["lr"] = lr
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def pretrain(project: Path, store: str, kill: str | None = None, run: str = "clip") -> subprocess.CompletedProcess:
    env = {**venv_env(), "MLFLOW_TRACKING_URI": store}
    if kill:
        env["DINORANKCLIP_KILL_AT"] = kill
    return subprocess.run(["dinorankclip", "pretrain", "--run", run, "--seed", "0"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def mlflow_runs(store: str, project: Path) -> list:
    """The live MLflow runs of `project`'s pretraining of clip, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("dinorankclip/demo")
    return client.search_runs([experiment.experiment_id], f"attributes.run_name = 'pretrain/clip/seed0' and "
                              f"tags.`dinorankclip.study_dir` = '{(project / 'results/demo').resolve()}'",
                              order_by=["attributes.start_time ASC"])


def losses(store: str, run) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "loss")]


def model_bytes(project: Path) -> bytes:
    return (project / "results/demo/pretrain/clip/seed0/model/open_clip_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, store):
    """(a project whose job was SIGKILLed right after its first checkpoint (step 2), then run again to the end, the
    bytes of its exported weights then)."""
    project = make_project(tmp_path_factory.mktemp("project"))
    killed = pretrain(project, store, KILL)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint.load(project / "results/demo/state/pretrain/clip/seed0" / checkpoint.LATEST)[
        "progress"]["step"] == 2
    resumed = pretrain(project, store)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stderr
    return project, model_bytes(project)


def test_a_killed_job_continues_its_mlflow_run_and_a_params_change_starts_a_new_one(killed_then_resumed, store):
    from mlflow.tracking import MlflowClient

    project, _ = killed_then_resumed
    client = MlflowClient(store)
    (first,) = mlflow_runs(store, project)
    assert first.info.status == "FINISHED" and first.data.tags["resumed"] == "true"
    assert losses(store, first) == [1, 2, 3, 4, 5, 6]  # steps up to the checkpoint flushed with it, the rest once
    timings = json.loads((project / "results/demo/timings/pretrain/clip/seed0.json").read_text())
    assert timings["resumes"] == 1 and timings["train_seconds"] > 0 and timings["device_hours"] > 0

    state = project / "results/demo/state/pretrain/clip/seed0"
    assert not state.exists()  # the finished job removed its checkpoints once its output was published
    set_lr(project, 1e-4)
    rerun = pretrain(project, store)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed at step" not in rerun.stderr  # (a checkpoint of other settings: tests/test_engine.py)
    old, new = mlflow_runs(store, project)
    assert old.info.run_id == first.info.run_id and old.data.params["pretrain.lr"] == "0.003"
    assert losses(store, old) == [1, 2, 3, 4, 5, 6]  # untouched by the new settings
    assert new.data.params["pretrain.lr"] == "0.0001" and "resumed" not in new.data.tags
    assert new.info.status == "FINISHED" and losses(store, new) == [1, 2, 3, 4, 5, 6]
    assert old.data.tags["dinorankclip.key"] != new.data.tags["dinorankclip.key"]
    assert json.loads((project / "results/demo/timings/pretrain/clip/seed0.json").read_text())["resumes"] == 0

    again = pretrain(project, store)  # the same settings again (a forced rerun): it replaces its run, no third run
    assert again.returncode == 0, again.stderr[-3000:]
    kept, latest = mlflow_runs(store, project)
    assert kept.info.run_id == old.info.run_id and latest.info.run_id != new.info.run_id
    assert latest.data.tags["dinorankclip.key"] == new.data.tags["dinorankclip.key"]
    assert client.get_run(new.info.run_id).info.lifecycle_stage == "deleted"  # in MLflow's trash, tagged


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, store,
                                                                               killed_then_resumed):
    project = make_project(tmp_path)
    state = project / "results/demo/state/pretrain/clip/seed0"
    assert pretrain(project, store, KILL).returncode == -9  # killed after the checkpoint of step 2
    assert pretrain(project, store, KILL).returncode == -9  # resumed, killed after the checkpoint of step 3
    assert checkpoint.load(state / checkpoint.PREVIOUS)["progress"]["step"] == 2
    whole = (state / checkpoint.LATEST).read_bytes()
    (state / checkpoint.LATEST).write_bytes(whole[: len(whole) // 2])

    result = pretrain(project, store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{STATE}/{checkpoint.LATEST}: not a readable checkpoint" in result.stderr  # paths from the project
    assert re.search(r"set aside as latest\.corrupt-\d{8}T\d{6}Z\.pt", result.stderr), result.stderr[-3000:]
    assert "resumed at step 2" in result.stderr
    assert not state.exists()  # published: the checkpoints, the set-aside one included, are gone
    # the same weights, byte for byte, as the job that was killed once and resumed from a whole checkpoint
    assert model_bytes(project) == killed_then_resumed[1]


def test_a_truncated_latest_checkpoint_without_a_previous_one_starts_afresh(tmp_path, store, killed_then_resumed):
    project = make_project(tmp_path)
    state = project / "results/demo/state/pretrain/clip/seed0"
    assert pretrain(project, store, KILL).returncode == -9
    (state / checkpoint.LATEST).write_bytes((state / checkpoint.LATEST).read_bytes()[:1000])
    result = pretrain(project, store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a readable checkpoint" in result.stderr and "resumed at step" not in result.stderr
    assert result.stderr.count("set aside as latest.corrupt-") == 1
    assert model_bytes(project) == killed_then_resumed[1]


def test_a_truncated_image_shard_stops_the_job_before_training_naming_it(tmp_path, store):
    project = make_project(tmp_path)
    shard = "results/demo/data/shards/00001.tar"
    with tarfile.open(project / shard) as tar:
        last = [m for m in tar if m.isfile()][-1]
    data = (project / shard).read_bytes()
    (project / shard).write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last sample
    result = pretrain(project, store)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {shard}: ends inside {last.name} (truncated)"
    assert "Traceback" not in result.stderr and "step 1/" not in result.stderr


def test_a_feature_shard_missing_its_last_key_stops_the_job_before_training_naming_it(tmp_path, store):
    """The teacher cache of an injected run: its index lists 24 samples in shard 00001, the tar holds 23."""
    project = make_project(tmp_path, run="drc-r3")
    keys = {"00000.tar": [f"00000{i:04d}" for i in range(40)], "00001.tar": [f"00001{i:04d}" for i in range(24)]}
    write_features(project / "results/demo/teacher", keys)
    shard = "results/demo/teacher/features/00001.tar"
    with tarfile.open(project / shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.startswith("000010023.")]
    with tarfile.open(project / shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    result = pretrain(project, store, run="drc-r3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {shard}: 23 samples, but results/demo/teacher/features.json lists 24; rebuild the stage that "
        "wrote it")
    assert "step 1/" not in result.stderr


def test_a_shard_of_another_size_than_its_index_records_is_refused(tmp_path):
    from dinorankclip.data.loader import check_shards
    from dinorankclip.errors import InputError

    make_image_shards(tmp_path / "data", [5, 3])
    index = tmp_path / "data/shards.json"
    listing = json.loads(index.read_text())
    for entry in listing["shardlist"]:
        entry["filesize"] = (tmp_path / "data" / entry["url"]).stat().st_size
    index.write_text(json.dumps(listing))
    check_shards(index)
    shard = tmp_path / "data/shards/00000.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    with pytest.raises(InputError, match=rf"{shard}: {listing['shardlist'][0]['filesize'] + 512} bytes, but {index} "
                                         rf"records {listing['shardlist'][0]['filesize']}: the shard was truncated"):
        check_shards(index)
    shard.unlink()
    with pytest.raises(InputError, match=rf"{index}: shard shards/00000.tar is missing"):
        check_shards(index)
