"""Shared fixtures: the repository and a fresh copy of its parameters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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
