"""The data stage under faults: real kills at named points, and (further down) hostile servers and files."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import tiny_world_cfg, tiny_world_params, venv_env

from dinorankclip.config import resolve
from dinorankclip.data.download import build_shards
from dinorankclip.data.source import build_source
from dinorankclip.faults import KILL_ENV
from dinorankclip.io import atomic_dir, read_json, write_json

UMASK = 0o027  # group may read, others nothing: a shared cluster project folder


def data_stage(cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`dinorankclip data` in `cwd` (its params.yaml), as Snakemake and DVC run it, optionally told to kill itself."""
    env = venv_env()
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "dinorankclip", "--params", "params.yaml", "data"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600, umask=UMASK)


def published(cwd: Path) -> dict:
    """What a data stage output holds: its counts, index, manifest, the bytes of every shard, and every mode."""
    out = cwd / "results" / "demo" / "data"
    return {"stats": read_json(out / "stats.json"), "index": read_json(out / "shards.json"),
            "downloads": (out / "downloads.tsv").read_text(),
            "shards": {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))},
            "modes": {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A study folder with the tiny world's source stage done, and the output of an uninterrupted data stage."""
    params = tiny_world_params()
    clean = tmp_path_factory.mktemp("uninterrupted")
    (clean / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clean / "results" / "demo" / "source").mkdir(parents=True)
    build_source(resolve(params, "demo"), clean / "results" / "demo" / "source")
    fresh = tmp_path_factory.mktemp("fresh")
    shutil.copytree(clean, fresh, dirs_exist_ok=True)  # the same world (same URLs) before any data stage ran
    done = data_stage(clean)
    assert done.returncode == 0, done.stderr[-3000:]
    output = published(clean)
    # the modes the umask gives, so a group shares the output on a cluster filesystem (not tempfile's 0600/0700)
    assert {p: mode for p, mode in output["modes"].items() if mode != (0o750 if p in (".", "shards") else 0o640)} == {}
    return fresh, output


def test_a_kill_while_publishing_loses_nothing_and_the_rerun_equals_an_uninterrupted_run(reference):
    cwd, expected = reference
    results, staging = cwd / "results" / "demo", cwd / "results" / "demo" / "state" / "data"
    assert expected["stats"]["stored"] == 40 and len(expected["shards"]) == 3

    killed = data_stage(cwd, kill_at="data:publish")  # the output is complete but not yet renamed into place
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "kill point data:publish reached" in killed.stderr
    assert not (results / "data").exists()
    assert len(list((staging / "shards").glob("*.tar"))) == 3  # the staging still holds every shard
    assert len(list(results.glob(".data.tmp-*"))) == 1  # the unpublished output, hidden

    killed = data_stage(cwd, kill_at="data:published")  # renamed, but the staging is not yet removed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert published(cwd) == expected and staging.exists()
    assert list(results.glob(".data.tmp-*")) == []  # the next attempt removed the killed one's leftovers

    rerun = data_stage(cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert published(cwd) == expected
    assert not staging.exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cfg, folder) of the tiny world downloaded in-process: folder/source, folder/staging, folder/data."""
    cfg, root = tiny_world_cfg(), tmp_path_factory.mktemp("built")
    for name in ("source", "data"):
        (root / name).mkdir()
    build_source(cfg, root / "source")
    build_shards(cfg, root / "source", root / "staging", root / "data")
    return cfg, root


def rebuild(built, tmp_path, damage) -> Path:
    """A copy of `built`'s staging, damaged by `damage(shard folder)`, built again into tmp_path/again."""
    cfg, root = built
    shutil.copytree(root / "staging", tmp_path / "staging")
    damage(tmp_path / "staging" / "shards")
    (tmp_path / "again").mkdir()
    build_shards(cfg, root / "source", tmp_path / "staging", tmp_path / "again")
    return tmp_path / "again"


def test_a_shard_recorded_as_done_without_its_tar_is_downloaded_again(built, tmp_path):
    """The fault behind a lost output: img2dataset's `<shard>_stats.json` survives, its tar does not. The stage
    must store the shard again, not count its images from the parquet file and publish an empty shard list."""
    _, root = built
    assert (root / "staging" / "shards" / "00001_stats.json").exists()
    again = rebuild(built, tmp_path, lambda shards: (shards / "00001.tar").unlink())
    assert read_json(again / "stats.json") == read_json(root / "data" / "stats.json")
    assert read_json(again / "shards.json") == read_json(root / "data" / "shards.json")
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (again / "shards" / name).read_bytes() == (root / "data" / "shards" / name).read_bytes()


def test_a_shard_holding_samples_nobody_downloaded_is_not_published(built, tmp_path):
    def plant(shards):
        shard = shards / "00000.tar"
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        shard.unlink()  # a new file: the published hard link keeps the old bytes
        first = members[0][0].name.split(".")[0]
        with tarfile.open(shard, "w") as tar:
            for m, payload in members:
                m.name = m.name.replace(first, "9999999") if m.name.startswith(f"{first}.") else m.name
                tar.addfile(m, io.BytesIO(payload))

    with pytest.raises(RuntimeError, match=r"00000.tar holds samples with no recorded download \(\['9999999'\]\)"):
        rebuild(built, tmp_path, plant)
    assert os.listdir(tmp_path / "again") == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask):
    """tempfile's 0600/0700 made every published output unreadable to the group on a shared filesystem."""
    before = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "stage") as out:
            write_json(out / "stats.json", {"n": 1})
            (out / "shards").mkdir()
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "stage" / "shards").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "stage" / "stats.json").stat().st_mode) == 0o666 & ~umask


def test_a_killed_writers_temporary_folders_are_removed_by_the_next_attempt(tmp_path):
    (tmp_path / ".stage.tmp-0a1b2c3d4e5f").mkdir()  # what a kill inside `atomic_dir` leaves
    (tmp_path / ".stage.tmp-0a1b2c3d4e5f" / "half.tar").write_bytes(b"x" * 100)
    (tmp_path / ".stage-other.tmp-0a1b2c3d4e5f").mkdir()  # another output's: not ours to remove
    with atomic_dir(tmp_path / "stage") as out:
        (out / "done").write_text("yes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stage-other.tmp-0a1b2c3d4e5f", "stage"]

