"""Shared fixtures. Tests needing ../shared skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QBERT_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} not present (a fresh clone lacks ../shared; CI has it)")
    return path


@pytest.fixture
def instruments_dir() -> Path:
    return shared_dataset("amazon-instruments")


@pytest.fixture
def ml100k_dir() -> Path:
    return shared_dataset("ml-100k")
