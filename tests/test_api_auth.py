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
    # header values arrive latin-1-decoded: only SP and HTAB are whitespace, 0x85 / 0xA0 are part of the key
    ("Bearer sk-a\xa0", False), ("Bearer sk-a\x85", False), ("Bearer \xa0sk-a", False), ("\x85Bearer sk-a", False),
    ("\tBearer sk-a\t ", True),
])
def test_bearer_check(header, ok):
    checker = KeyChecker(["sk-a", "sk-b"])
    reason = checker.check(header)
    assert (reason is None) == ok
    if reason is not None:
        assert "sk-" not in reason  # never echo what was sent


@pytest.mark.parametrize("key", ["sk-voilà", "sk-ключ-х", "sk-Š", "sk-ключ-🔑"])
def test_utf8_keys_match_their_bytes_as_sent(key):
    """A UTF-8 key reaches the checker latin-1-decoded; its last byte may be 0x85 (`х`) or 0xA0 (`à`, `Š`), which
    str.strip() used to remove, so such a key could never log in."""
    checker = KeyChecker([key])
    sent = key.encode("utf-8").decode("latin-1")
    assert checker.check("Bearer " + sent) is None
    assert checker.check("Bearer " + sent + " ") is None
    assert checker.check("Bearer " + sent[:-1]) is not None
