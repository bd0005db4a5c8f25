"""Signed, expiring output links (`storage/base.py`, `storage/local.py`): signing, tampering, expiry, janitor,
restart."""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from step1x_edit.storage.base import ascii_decimal
from step1x_edit.storage.local import LocalImageStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _parts(path: str) -> tuple[str, str, str]:
    url = urlsplit(path)
    q = parse_qs(url.query)
    return url.path.rsplit("/", 1)[1], q["expires"][0], q["sig"][0]


def _bytes(blob) -> bytes:
    return b"".join(blob.chunks)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> LocalImageStore:
    return LocalImageStore(tmp_path / "images", expiry_s=7 * 24 * 3600, clock=clock)


def test_signed_link_resolves_to_the_file(store, clock):
    image_id = store.put(b"png-bytes")
    path = store.link(image_id)
    assert path.startswith(f"/v1/files/images/{image_id}?expires=") and image_id.endswith(".png")
    iid, expires, sig = _parts(path)
    assert int(expires) == int(clock.now) + 7 * 24 * 3600
    assert _bytes(store.open(iid, expires, sig)) == b"png-bytes"


def test_tampered_links_do_not_resolve(store):
    a, b = store.put(b"a"), store.put(b"b")
    iid, expires, sig = _parts(store.link(a))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    for args in [(iid, expires, flipped), (iid, str(int(expires) + 1), sig), (b, expires, sig),
                 (iid, expires, None), (iid, None, sig), (iid, "-5", sig), (iid, expires, ""),
                 ("../../etc/passwd", expires, sig), (iid.upper(), expires, sig), (iid, expires + "0", sig)]:
        assert store.open(*args) is None, args


_FULL_WIDTH = str.maketrans("0123456789abcdef", "０１２３４５６７８９ａｂｃｄｅｆ")


def test_link_fields_must_be_ascii(store):
    """`²` and `①` pass str.isdigit() but not int() (was: ValueError, a 500 through the file route); a non-ASCII
    signature made hmac.compare_digest raise TypeError (another 500); full-width digits were read by int() as the
    same expiry, so one link had several spellings. All are simply links that do not resolve now."""
    iid, expires, sig = _parts(store.link(store.put(b"x")))
    assert store.open(iid, expires, sig) is not None
    for bad_expires in ("²", "①", "1²", expires[:-1] + "²", expires[:-1] + "①", expires.translate(_FULL_WIDTH),
                        "\u0661\u0662", expires + "\n", " " + expires, "+" + expires, "1_0", "٣" * 10):
        assert store.open(iid, bad_expires, sig) is None, bad_expires
    for bad_sig in ("é" * 64, sig[:-1] + "é", sig.translate(_FULL_WIDTH), "\udcff" * 64, sig + "\n"):
        assert store.open(iid, expires, bad_sig) is None, bad_sig
    assert store.open(iid + "\n", expires, sig) is None  # a name is exactly 32 hex digits + extension


@pytest.mark.parametrize("text,value", [("0", 0), ("0042", 42), ("999999999999", 999999999999),
                                        ("9999999999999", None), ("", None), (None, None), ("²", None),
                                        ("①", None), ("１", None), ("١", None), ("-1", None), ("1e3", None),
                                        (" 1", None), ("1 ", None), ("1_0", None)])
def test_ascii_decimal(text, value):
    assert ascii_decimal(text, max_digits=12) == value


def test_expired_link_does_not_resolve(store, clock):
    iid, expires, sig = _parts(store.link(store.put(b"x")))
    clock.now += 7 * 24 * 3600
    assert store.open(iid, expires, sig) is not None  # the last second is still valid
    clock.now += 1
    assert store.open(iid, expires, sig) is None


def test_a_link_made_late_in_a_second_still_lives_its_full_expiry(tmp_path, clock):
    """Expiries are whole seconds: rounding down would cut up to a second off the promise (a 1 s link could be
    dead on arrival), so they round up, and the janitor waits that extra second before removing the file."""
    store = LocalImageStore(tmp_path / "images", expiry_s=5, clock=clock)
    clock.now = 1_800_000_000.9
    name = store.put(b"x")
    os.utime(store.directory / name, (clock.now, clock.now))
    iid, expires, sig = _parts(store.link(name))
    clock.now += 5
    assert store.open(iid, expires, sig) is not None
    assert store.expire() == 0  # the link still works, so the file stays
    clock.now += 1.2
    assert store.open(iid, expires, sig) is None
    assert store.expire() == 1


def test_janitor_deletes_only_expired_files(store, clock, tmp_path):
    old, new = store.put(b"old"), store.put(b"new")
    stale_tmp = store.directory / ".tmp-abc.png"
    stale_tmp.write_bytes(b"partial")
    unrelated = store.directory / "README.txt"
    unrelated.write_text("keep me")
    week = 7 * 24 * 3600
    for p in (store.directory / old, stale_tmp, unrelated):
        os.utime(p, (clock.now - week - 10, clock.now - week - 10))
    os.utime(store.directory / new, (clock.now - 10, clock.now - 10))
    assert store.expire() == 2
    assert not (store.directory / old).exists() and not stale_tmp.exists()
    assert (store.directory / new).exists() and unrelated.exists()
    assert (store.directory / ".signing-key").exists()


def test_links_and_files_survive_a_restart(tmp_path):
    first = LocalImageStore(tmp_path / "d", expiry_s=60)
    iid, expires, sig = _parts(first.link(first.put(b"kept")))
    key_file = tmp_path / "d" / ".signing-key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    second = LocalImageStore(tmp_path / "d", expiry_s=60)  # a new process: key read back from the directory
    assert _bytes(second.open(iid, expires, sig)) == b"kept"
    other = LocalImageStore(tmp_path / "d", expiry_s=60, key=b"k" * 32)  # a configured key differs
    assert other.open(iid, expires, sig) is None


def test_configured_key_is_used(tmp_path):
    a = LocalImageStore(tmp_path / "a", expiry_s=60, key=b"shared-secret-key-0123456789abcdef")
    iid, expires, sig = _parts(a.link(a.put(b"x")))
    assert not (tmp_path / "a" / ".signing-key").exists()
    assert a.open(iid, expires, sig) is not None
    assert int(expires) <= time.time() + 61
