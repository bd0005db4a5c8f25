"""Shared fixtures: where the golden data and example photos live (../shared beside the checkout)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEP1X_SHARED_DIR", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
EXAMPLES = SHARED / "examples"

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tests never see the developer's own configuration or weights: no STEP1X_* settings (but where the shared data and
# the tokenizer cache are), an empty Hugging Face cache, and no hub access.
# (the browser test's own switches, not settings, stay too)
_KEEP = ("STEP1X_SHARED_DIR", "STEP1X_CACHE_DIR", "STEP1X_SKIP_BROWSER", "STEP1X_CHROMIUM", "STEP1X_UPDATE_SCREENSHOT")
for _var in [v for v in os.environ if v.startswith("STEP1X_") and v not in _KEEP]:
    del os.environ[_var]
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="step1x-test-hub-")
os.environ["HF_HUB_OFFLINE"] = "1"


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
