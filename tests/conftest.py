"""Shared fixtures (the repository, a fresh copy of its parameters, one torch thread, the reduced study) and how
`make test` spreads the modules over its workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import REPO, copy_clone, free_port, reduced_study, repo_params, snakemake, snapshot_repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# `make test` runs on pytest-xdist workers, each group below going to one worker whole, the groups in the order of
# the collection (`--no-loadscope-reorder`). A module is a group, so its module fixtures are built once. These modules
# are one group: they read the session's reduced study (below) or start a SLURM test cluster, whose daemons hold fixed
# ports.
ONE_WORKER = ("test_preflight_study.py", "test_slurm.py", "test_preflight_multinode.py", "test_dvc_agreement.py",
              "test_dvc_remote.py")
# The longest groups start first, so that no worker is left with one of them while the other has nothing to do.
LONGEST_FIRST = ("test_demo_e2e.py", "test_preflight_study.py")


def worker_group(module: str) -> str:
    return "slurm-and-reduced-study" if module in ONE_WORKER else module


def pytest_collection_modifyitems(config, items):
    rank = {worker_group(module): i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(worker_group(item.path.name), len(rank)))  # stable: file order kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with `worker_group` as the scope. (Its `--dist loadgroup` names groups by rewriting
    item._nodeid, which pytest 9.2 no longer reads: every test would be a group of its own.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])

    return ByGroup(config, log)


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
