"""Shared fixtures: the repository, a fresh copy of its parameters, one torch thread, and the reduced study."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import REPO, copy_clone, free_port, reduced_study, repo_params, snakemake, snapshot_repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def params() -> dict:
    """A fresh copy of params.yaml, safe to modify."""
    return repo_params()


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny tensors: on shared cores torch's thread pool stalls in spin-waits and
    runs several times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reduced_inputs(tmp_path_factory) -> Path:
    """A fresh clone holding the reduced study (helpers.reduced_study, committed) with its local rules done: the
    world and its download. The SLURM and local runs both start from copies of it."""
    import subprocess

    clone = snapshot_repo(tmp_path_factory.mktemp("reduced"))
    reduced_study(clone, free_port())
    subprocess.run(["git", "commit", "-qam", "reduced study"], cwd=clone, check=True)
    snakemake(clone, ["results/demo/data"], timeout=600)
    return clone


@pytest.fixture(scope="session")
def local_study(reduced_inputs, tmp_path_factory) -> Path:
    """The reduced study run to the end on this machine, without a scheduler."""
    clone = copy_clone(reduced_inputs, tmp_path_factory.mktemp("local"))
    snakemake(clone, ["all"], timeout=1200)
    return clone
