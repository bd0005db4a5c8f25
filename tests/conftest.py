"""Shared fixtures: where the golden data and example photos live (../shared beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEP1X_SHARED_DIR", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
EXAMPLES = SHARED / "examples"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "tiny-a" / "cases.json").is_file():
        pytest.fail(f"golden data not found at {GOLDEN} (set STEP1X_SHARED_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    if not (EXAMPLES / "0000.jpg").is_file():
        pytest.fail(f"example images not found at {EXAMPLES} (set STEP1X_SHARED_DIR)")
    return EXAMPLES
