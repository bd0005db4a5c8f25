"""Authentication and signed links under attack: missing, malformed and wrong keys (over raw sockets where a
client library would refuse to send the header), constant-time comparison, and output links that are altered,
extended, borrowed from another image, expired, or aimed at files that are not images.
"""

from __future__ import annotations

import hmac
import os
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import data_uri, dev_settings, start_server  # noqa: E402

from step1x_edit.api import auth as auth_module  # noqa: E402
from step1x_edit.api.auth import KeyChecker  # noqa: E402
from step1x_edit.storage import base as storage_base  # noqa: E402
from step1x_edit.storage.local import LocalImageStore  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MODEL = "stepfun-ai/step1x-edit"
KEY_A, KEY_UTF8 = "sk-attack-test-a", "sk-ключ-🔑"
# UTF-8 keys whose last byte is 0x85 or 0xA0, which str.strip() removes from a latin-1-decoded header (NEL, NBSP)
KEYS_ENDING_85_A0 = ["sk-voilà", "sk-ключ-х", "sk-Š"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(dev_settings(tmp_path_factory.mktemp("auth"), api_keys=",".join([KEY_A, KEY_UTF8, *KEYS_ENDING_85_A0])))
    yield running
    running.stop()


def raw_request(server, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a bare socket (headers exactly as given); returns status, headers, body."""
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header_blob, _, payload = data.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def models_with(server, authorization: bytes | None) -> tuple[int, dict[str, str], bytes]:
    head = b"GET /v1/models HTTP/1.1"
    if authorization is not None:
        head += b"\r\nAuthorization: " + authorization
    return raw_request(server, head)


# --- keys -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,reason", [
    (None, "Missing API key"), (b"", "Missing API key"), (b"Bearer", "Malformed"), (b"Bearer    ", "Malformed"),
    (b"Basic c2stYXR0YWNrLXRlc3QtYQ==", "Malformed"), (b"Token sk-attack-test-a", "Malformed"),
    (b"sk-attack-test-a", "Malformed"), (b"Bearer\tsk-attack-test-a", "Malformed"),
    (b"Bearer sk-attack-test-b", "Incorrect"), (b"Bearer sk-attack-test-a ", None),
    (b"Bearer sk-attack-test-a sk-attack-test-a", "Incorrect"), (b"Bearer sk-attack-test-", "Incorrect"),
    (b"Bearer SK-ATTACK-TEST-A", "Incorrect"), (b"Bearer \xff\xfe\x80", "Incorrect"),
    (b"Bearer " + b"A" * 8000, "Incorrect"), (b"Bearer  sk-attack-test-a", None), (b"bearer sk-attack-test-a", None),
    (b"BEARER sk-attack-test-a", None), (b"Bearer " + KEY_UTF8.encode("utf-8"), None),
    (b"Bearer " + KEY_UTF8.encode("utf-8")[:-1], "Incorrect"),
    # only SP / HTAB are whitespace around the key (RFC 9110 OWS); 0x85 and 0xA0 are bytes of the key
    *[(b"Bearer " + key.encode("utf-8"), None) for key in KEYS_ENDING_85_A0],
    *[(b"Bearer " + key.encode("utf-8") + b" \t", None) for key in KEYS_ENDING_85_A0],
    *[(b"Bearer " + key.encode("utf-8")[:-1], "Incorrect") for key in KEYS_ENDING_85_A0],
    (b"Bearer sk-attack-test-a\xa0", "Incorrect"), (b"Bearer sk-attack-test-a\x85", "Incorrect"),
    (b"Bearer \xa0sk-attack-test-a", "Incorrect"), (b"Bearer\xa0sk-attack-test-a", "Malformed"),
    (b"\xa0Bearer sk-attack-test-a", "Malformed"), (b"Bearer sk-attack-test-a\t", None),
])
def test_authorization_headers(server, header, reason):
    status, headers, body = models_with(server, header)
    if reason is None:
        assert status == 200, body
        return
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    text = body.decode()
    assert reason in text and headers["x-request-id"] in text
    assert "sk-attack" not in text and "AAAA" not in text  # what was sent is never echoed


def test_two_authorization_headers_do_not_combine_into_access(server):
    status, _, _ = raw_request(server, b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer wrong\r\n"
                                       b"Authorization: Bearer sk-attack-test-a")
    assert status == 401  # the first one counts; a proxy appending a second cannot smuggle a key in


def test_every_api_route_needs_the_key_before_reading_the_body(server):
    for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/images/generations"),
                         ("POST", "/v1/images/edits"), ("GET", "/v1/anything-else")]:
        r = httpx.request(method, server.base_url + path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401, path
    # a huge declared body without a key: refused at once, the body is never waited for
    t0 = time.monotonic()
    status, _, _ = raw_request(server, b"POST /v1/images/generations HTTP/1.1\r\nContent-Type: application/json"
                                       b"\r\nContent-Length: 30000000")
    assert status == 401 and time.monotonic() - t0 < 5
    for path in ("/health", "/ready", "/openapi.json"):
        assert httpx.get(server.base_url + path).status_code == 200


def test_metrics_need_the_key_when_keys_are_set(server, tmp_path):
    """/metrics shows queue depth and traffic by route: with keys configured it takes the same Bearer key as the
    API (was: open to anyone); STEP1X_METRICS_OPEN=1 opens it again, and a server without keys stays open."""
    for authorization in (None, b"Bearer wrong", b"Basic " + KEY_A.encode()):
        status, headers, body = models_with(server, authorization)  # (the API, for comparison)
        assert status == 401
        head = b"GET /metrics HTTP/1.1" + (b"\r\nAuthorization: " + authorization if authorization else b"")
        status, headers, body = raw_request(server, head)
        assert status == 401 and headers["www-authenticate"] == "Bearer", body
        assert b"step1x_" not in body and b'"error"' in body
    r = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200 and "step1x_queue_depth" in r.text and r.headers["content-type"].startswith("text/plain")
    assert server.app.openapi()["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    for name, extra in (("open", {"api_keys": KEY_A, "metrics_open": True}), ("no-keys", {})):
        settings = dev_settings(tmp_path / name, **extra)
        other = start_server(settings, wait_ready=False)
        try:
            r = httpx.get(other.base_url + "/metrics")
            assert r.status_code == 200 and "step1x_queue_depth" in r.text, name
            assert httpx.get(other.base_url + "/v1/models").status_code == (401 if settings.api_keys else 200)
        finally:
            other.stop()


def test_key_comparison_is_constant_time(monkeypatch):
    """Every configured key is compared with hmac.compare_digest on SHA-256 digests (equal lengths), with no early
    exit: the work does not depend on which key (if any) matched or how much of it was right."""
    calls: list[tuple[int, int]] = []

    class Spy:
        @staticmethod
        def compare_digest(a, b):
            calls.append((len(a), len(b)))
            return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth_module, "hmac", Spy)
    checker = KeyChecker(["sk-one", "sk-two-longer", "sk-3"])
    for header in ("Bearer sk-one", "Bearer sk-3", "Bearer sk-on", "Bearer " + "x" * 500):
        calls.clear()
        checker.check(header)
        assert calls == [(32, 32)] * 3, header


def test_link_signature_comparison_is_constant_time(tmp_path, monkeypatch):
    store = LocalImageStore(tmp_path, expiry_s=60)
    image_id = store.put(b"x")
    query = parse_qs(urlsplit(store.link(image_id)).query)
    used: list[int] = []
    real = hmac.compare_digest

    class Spy:
        new = staticmethod(hmac.new)

        @staticmethod
        def compare_digest(a, b):
            used.append(1)
            return real(a, b)

    monkeypatch.setattr(storage_base, "hmac", Spy)
    assert store.open(image_id, query["expires"][0], query["sig"][0]) is not None
    assert store.open(image_id, query["expires"][0], "0" * 64) is None
    assert used == [1, 1]


# --- signed links ---------------------------------------------------------------------------------------------------
def _make_link(server) -> str:
    r = httpx.post(server.api + "/images/generations", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                   json={"model": MODEL, "prompt": "p", "image": data_uri(), "steps": 1, "guidance_scale": 1})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["url"]


def _parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    return parts.path.rsplit("/", 1)[1].removesuffix(".png"), int(q["expires"][0]), q["sig"][0]


def _get(server, image_id: str, expires, sig) -> httpx.Response:
    return httpx.get(f"{server.api}/files/images/{image_id}.png", params={"expires": expires, "sig": sig})


def test_signed_links_cannot_be_forged_or_extended(server):
    a_id, a_exp, a_sig = _parts(_make_link(server))
    b_id, b_exp, b_sig = _parts(_make_link(server))
    assert _get(server, a_id, a_exp, a_sig).status_code == 200
    store = server.app.state.server.store
    attempts = {
        "extended by a second": (a_id, a_exp + 1, a_sig),
        "extended by a year": (a_id, a_exp + 365 * 86400, a_sig),
        "shortened": (a_id, a_exp - 1, a_sig),
        "another image's id": (b_id, a_exp, a_sig),
        "signature of another image": (a_id, b_exp, b_sig),
        "flipped signature": (a_id, a_exp, a_sig[:-1] + ("0" if a_sig[-1] != "0" else "1")),
        "truncated signature": (a_id, a_exp, a_sig[:32]),
        "empty signature": (a_id, a_exp, ""),
        "non-hex signature": (a_id, a_exp, "z" * 64),
        "signed with another key": (a_id, a_exp, hmac.new(b"k" * 32, f"{a_id}.png:{a_exp}".encode(),
                                                          "sha256").hexdigest()),
        "expired, correctly signed": (a_id, int(time.time()) - 1, store.signer.sign(a_id + ".png", int(time.time()) - 1)),
        "negative expiry": (a_id, "-1", a_sig),
        "13-digit expiry": (a_id, "9" * 13, a_sig),
        "expiry not a number": (a_id, "1e20", a_sig),
        "unknown id, valid signature": ("0" * 32, a_exp, store.signer.sign("0" * 32 + ".png", a_exp)),
    }
    for name, (image_id, expires, sig) in attempts.items():
        r = _get(server, image_id, expires, sig)
        assert r.status_code == 404, name
        assert r.json()["error"]["code"] == "not_found", name
    # a signature is hex: upper case is the same signature, not a different link
    assert _get(server, a_id, a_exp, a_sig.upper()).status_code == 200


def test_link_fields_in_other_scripts_are_404_not_500(server):
    """Any field parsed from the URL is ASCII: superscript / circled / full-width / Arabic-Indic digits in `expires`
    (was: 500, `int("²")` after `"²".isdigit()`; full-width digits were the same link spelled differently) and a
    non-ASCII `sig` (was: 500, TypeError in hmac.compare_digest). No key is needed for file links, so these were
    500s anyone could provoke."""
    a_id, a_exp, a_sig = _parts(_make_link(server))
    full_width = str.maketrans("0123456789abcdef", "０１２３４５６７８９ａｂｃｄｅｆ")
    cases = [(str(a_exp)[:-1] + "²", a_sig), ("①", a_sig), ("²", a_sig), (str(a_exp).translate(full_width), a_sig),
             ("\u0661" * 10, a_sig), (a_exp, "é" * 64), (a_exp, a_sig[:-1] + "é"), (a_exp, a_sig.translate(full_width))]
    for expires, sig in cases:
        r = _get(server, a_id, expires, sig)
        assert r.status_code == 404, (expires, sig, r.text)
        assert r.json()["error"]["code"] == "not_found"
    # the same through raw %-escapes (UTF-8, as a browser sends them)
    for query in (b"expires=%C2%B2&sig=" + a_sig.encode(), f"expires={a_exp}&sig=%C3%A9".encode()):
        status, _, body = raw_request(server, b"GET /v1/files/images/" + a_id.encode() + b".png?" + query +
                                      b" HTTP/1.1")
        assert status == 404, body
    assert _get(server, a_id, a_exp, a_sig).status_code == 200


@pytest.mark.parametrize("path", [
    "/v1/files/images/..%2F.signing-key.png", "/v1/files/images/%2E%2E/%2E%2E/etc/passwd.png",
    "/v1/files/images/.signing-key.png", "/v1/files/images/.tmp-x.png", "/v1/files/images/" + "a" * 31 + "G.png",
    "/v1/files/images/" + "A" * 32 + ".png", "/v1/files/images/x.png/../../.signing-key",
])
def test_links_never_reach_files_that_are_not_outputs(server, path):
    key = (server.app.state.server.store.directory / ".signing-key").read_bytes()
    r = httpx.get(server.base_url + path + "?expires=9999999999&sig=" + "0" * 64)
    assert r.status_code == 404 and key not in r.content
    assert r.json()["error"]["code"] == "not_found"


def test_other_methods_on_links_are_405_in_the_error_shape(server):
    image_id, expires, sig = _parts(_make_link(server))
    for method in ("POST", "PUT", "DELETE"):
        r = httpx.request(method, f"{server.api}/files/images/{image_id}.png", params={"expires": expires, "sig": sig})
        assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _get(server, image_id, expires, sig).status_code == 200  # still there
