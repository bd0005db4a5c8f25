"""Key handling (`api/auth.py`): sources, parsing of the header, messages that never echo a key."""

from __future__ import annotations

import pytest

from step1x_edit.api.auth import KeyChecker, load_keys
from step1x_edit.settings import Settings


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-file-1\n\n  sk-file-2  # laptop\n")
    monkeypatch.setenv("STEP1X_API_KEYS", " sk-env-1 ,sk-env-2,,")
    monkeypatch.setenv("STEP1X_API_KEYS_FILE", str(keys_file))
    settings = Settings()
    assert "sk-env-1" not in repr(settings)  # secrets stay out of reprs and logs
    assert load_keys(settings) == ["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]


def test_no_keys_means_open():
    checker = KeyChecker([])
    assert checker.open and checker.check(None) is None and checker.check("Bearer anything") is None


@pytest.mark.parametrize("header,ok", [
    ("Bearer sk-a", True), ("bearer sk-b", True), ("Bearer   sk-a  ", True),
    ("Bearer sk-c", False), ("Bearer sk-a2", False), ("Bearer sk-", False), ("Basic sk-a", False),
    ("sk-a", False), ("Bearer", False), ("", False), (None, False), ("Bearer \udcff", False),
])
def test_bearer_check(header, ok):
    checker = KeyChecker(["sk-a", "sk-b"])
    reason = checker.check(header)
    assert (reason is None) == ok
    if reason is not None:
        assert "sk-" not in reason  # never echo what was sent
