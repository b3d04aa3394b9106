"""Shared fixtures: the repository, a fresh copy of its parameters, and one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import REPO, repo_params

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
