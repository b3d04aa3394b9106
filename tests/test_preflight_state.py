"""A pretraining job removes its checkpoints from state/ only once its output is published and logged: a job that
fails before that (Snakemake then deletes its output) keeps them for the retry to resume from."""

import pytest

from dinorankclip import cli
from dinorankclip.layout import stage_dir, state_dir
from dinorankclip.train import pretrain as training

CFG = {"study": "s", "run": "clip", "seed": 3}


class Tracker:
    run_id = "run"

    def __init__(self, fail: str = "") -> None:
        self.fail = fail  # "artifact": uploads fail; "drain": the last send of buffered metrics fails

    def log_artifact(self, path, *args) -> None:
        if self.fail == "artifact":
            raise ConnectionError("the tracking server is gone")

    def log_metrics(self, metrics, step) -> None:
        pass

    def drain(self) -> None:
        if self.fail == "drain":
            raise ConnectionError("the tracking store is still locked")


def trains(fail: bool = False):
    """The training loop as the job sees it: checkpoints in state/, the exports and metrics in the output."""
    def run(cfg, data_dir, stage_dirs, out, tracker, state, sample_cache=None):
        state.mkdir(parents=True, exist_ok=True)
        (state / "latest.pt").write_bytes(b"\0" * 4096)
        (state / "best.pt").write_bytes(b"\0" * 1024)
        if fail:
            raise RuntimeError("killed at the last step")
        (out / "model").mkdir()
        (out / "metrics.json").write_text("{}")
        return {key: 0 for key in training.TIMING_KEYS}
    return run


def test_checkpoints_go_once_the_output_is_published_and_stay_when_the_job_fails_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state, output = state_dir("s", "pretrain", "clip", 3), stage_dir("s", "pretrain", "clip", 3)
    monkeypatch.setattr(training, "pretrain", trains(fail=True))
    with pytest.raises(RuntimeError):
        cli.cmd_pretrain(CFG, None, Tracker())
    assert sorted(p.name for p in state.iterdir()) == ["best.pt", "latest.pt"]
    assert not output.exists()
    monkeypatch.setattr(training, "pretrain", trains())
    for fail in ("artifact", "drain"):  # published, but the job fails: Snakemake deletes output
        with pytest.raises(ConnectionError):
            cli.cmd_pretrain(CFG, None, Tracker(fail=fail))
        assert (state / "latest.pt").is_file() and (output / "metrics.json").is_file(), fail
    cli.cmd_pretrain(CFG, None, Tracker())
    assert not state.exists() and (output / "metrics.json").is_file() and (output / "model").is_dir()
    assert state.parent.is_dir()  # only this (run, seed)'s folder goes
