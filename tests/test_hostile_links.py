"""Image links as an attacker would send them: names that resolve to loopback / private / link-local / metadata
addresses, redirects to them, DNS answers that change between check and fetch, slow-loris servers, endless bodies,
wrong content types.

All traffic stays on 127.0.0.1: names are answered by fake resolvers, forbidden addresses are refused before any
connection (a spy on the HTTP client proves that nothing was sent), and the only server ever contacted is the
local test site, which only the tests' address policy ("127.0.0.1 and nothing else") lets through. Every hostile
server loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, dev_settings, image_site, png_bytes, start_server  # noqa: E402

from step1x_edit.api.errors import APIError  # noqa: E402
from step1x_edit.api.links import LinkFetcher  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MODEL = "stepfun-ai/step1x-edit"
ONLY_TEST_SITE = lambda ip: str(ip) == "127.0.0.1"  # noqa: E731 - the one address tests may reach


class Resolver:
    """A fake DNS: a table of answers, or a list of answers given in turn (rebinding); records every query."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]]) -> None:
        self.table = table
        self.queries: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.queries.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise OSError("Name or service not known")
        if answer and isinstance(answer[0], list):  # successive answers: rebinding
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer  # type: ignore[return-value]


class SendSpy:
    """Counts requests the fetcher actually sends (monkeypatched onto httpx.AsyncClient.send)."""

    def __init__(self, monkeypatch) -> None:
        self.urls: list[str] = []
        original = httpx.AsyncClient.send
        spy = self

        async def send(client, request, **kw):
            spy.urls.append(str(request.url))
            return await original(client, request, **kw)

        monkeypatch.setattr(httpx.AsyncClient, "send", send)


def fetcher(resolver, **kw) -> LinkFetcher:
    args = dict(max_bytes=200_000, timeout_s=3, max_redirects=3, resolver=resolver, address_allowed=ONLY_TEST_SITE)
    args.update(kw)
    return LinkFetcher(**args)


def refused(coro, status: int = 400) -> APIError:
    with pytest.raises(APIError) as exc:
        asyncio.run(coro)
    assert exc.value.status == status, exc.value.message
    assert "'image'" in exc.value.message
    return exc.value


# --- forbidden targets: refused before any connection ------------------------------------------------------------
FORBIDDEN_NAMES = {
    "localhost": ["127.0.0.1"], "loop.test": ["127.0.0.2"], "lan.test": ["192.168.1.20"], "ten.test": ["10.1.2.3"],
    "cgnat.test": ["100.64.1.1"], "metadata.google.internal": ["169.254.169.254"], "aws.test": ["fd00:ec2::254"],
    "linklocal6.test": ["fe80::1"], "ula.test": ["fc00::5"], "mapped.test": ["::ffff:10.0.0.1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"], "zero.test": ["0.0.0.0"], "mixed.test": ["93.184.216.34", "10.0.0.9"],
    "2130706433": ["127.0.0.1"],  # what the OS makes of a decimal host (inet_aton); the answer is what counts
    "0x7f.1": ["127.0.0.1"],
}
FORBIDDEN_URLS = [f"http://{name}/a.png" for name in FORBIDDEN_NAMES] + [
    "http://127.0.0.1/a.png", "http://[::1]/a.png", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/", "http://[::ffff:169.254.169.254]/", "http://0.0.0.0:8000/",
    "https://10.0.0.1/a.png", "http://127.0.0.1:80@lan.test/a.png", "http://user:pw@metadata.google.internal/",
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_forbidden_targets_are_refused_without_traffic(monkeypatch, url):
    spy = SendSpy(monkeypatch)
    default_policy = LinkFetcher(max_bytes=1000, timeout_s=3, max_redirects=3, resolver=Resolver(FORBIDDEN_NAMES))
    err = refused(default_policy.fetch(url))
    assert "non-public" in err.message and err.code == "forbidden_image_url"
    assert spy.urls == []


@pytest.mark.parametrize("url,fragment", [
    ("file:///etc/passwd", "scheme 'file'"), ("gopher://127.0.0.1:70/", "scheme 'gopher'"),
    ("http://nowhere.test/a.png", "could not be resolved"), ("http://[::1/a.png", "not a valid URL"),
    ("http://:80/a.png", "no host"), ("http://example.test:99999/", "not a valid URL"),
])
def test_malformed_and_unresolvable_links_are_400(monkeypatch, url, fragment):
    spy = SendSpy(monkeypatch)
    err = refused(fetcher(Resolver({})).fetch(url))
    assert fragment in err.message
    assert spy.urls == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target", ["http://metadata.google.internal/latest/meta-data/", "http://lan.test/a.png",
                                    "http://[::1]:8080/", "http://loop.test/", "http://169.254.169.254/",
                                    "file:///etc/passwd"])
def test_redirects_to_forbidden_targets_are_refused(monkeypatch, status, target):
    with image_site() as site:
        site.add_redirect("/go", target, status)
        spy = SendSpy(monkeypatch)
        err = refused(fetcher(Resolver({"site.test": ["127.0.0.1"], **FORBIDDEN_NAMES})).fetch(
            f"http://site.test:{site.port}/go"))
        assert "non-public" in err.message or "scheme 'file'" in err.message
        assert [path for path, _ in site.hits] == ["/go"]  # only the first hop, on the test site
        assert len(spy.urls) == 1


# --- DNS that changes its answer -----------------------------------------------------------------------------------
def test_the_checked_address_is_the_one_connected_to(monkeypatch):
    """Rebinding: the name answers 127.0.0.1 (allowed here) when checked and 10.0.0.1 afterwards. The fetch resolves
    once and connects to the checked address, so the second answer is never used (and never reached)."""
    body = png_bytes()
    with image_site() as site:
        site.add_bytes("/cat.png", body)
        dns = Resolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
        spy = SendSpy(monkeypatch)
        assert asyncio.run(fetcher(dns).fetch(f"http://rebind.test:{site.port}/cat.png")) == body
        assert dns.queries == ["rebind.test"]
        assert spy.urls == [f"http://127.0.0.1:{site.port}/cat.png"]
        assert site.hits == [("/cat.png", f"rebind.test:{site.port}")]  # the name still travels as Host


def test_each_redirect_hop_is_resolved_and_checked_again(monkeypatch):
    """A redirect back to the same name gets a fresh lookup, and the (now private) answer is refused."""
    with image_site() as site:
        site.add_redirect("/hop", f"http://rebind.test:{site.port}/final.png")
        site.add_bytes("/final.png", png_bytes())
        dns = Resolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
        spy = SendSpy(monkeypatch)
        err = refused(fetcher(dns).fetch(f"http://rebind.test:{site.port}/hop"))
        assert "10.0.0.1" in err.message
        assert dns.queries == ["rebind.test", "rebind.test"]
        assert len(spy.urls) == 1 and [p for p, _ in site.hits] == ["/hop"]


# --- hostile servers: slow, endless, lying ------------------------------------------------------------------------
def _slow_loris(delay_s: float, *, headers: bool, max_s: float = 10.0):
    """A route that sends one byte every `delay_s` (in the headers or in the body), for at most `max_s`."""
    def route(h) -> None:
        deadline = time.monotonic() + max_s
        try:
            if headers:
                h.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while time.monotonic() < deadline:
                    h.wfile.write(b"X")  # a header line that never ends
                    h.wfile.flush()
                    time.sleep(delay_s)
            else:
                h.send_response(200)
                h.send_header("Content-Type", "image/png")
                h.send_header("Content-Length", "50000")  # under the byte limit: only the clock can stop it
                h.end_headers()
                while time.monotonic() < deadline:
                    h.wfile.write(b"\0")
                    h.wfile.flush()
                    time.sleep(delay_s)
        except OSError:  # the fetcher hung up: what we want
            pass
        h.close_connection = True
    return route


def _endless(chunk: bytes, *, max_bytes: int = 64 * 1024 * 1024, max_s: float = 10.0):
    """A chunked body that never ends (bounded here by bytes and time)."""
    def route(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent, deadline = 0, time.monotonic() + max_s
        try:
            while sent < max_bytes and time.monotonic() < deadline:
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
        h.close_connection = True
    return route


@pytest.mark.parametrize("headers", [True, False], ids=["trickled-headers", "trickled-body"])
def test_slow_loris_servers_are_cut_at_the_deadline(headers):
    with image_site() as site:
        site.routes["/slow.png"] = _slow_loris(0.1, headers=headers)
        t0 = time.monotonic()
        err = refused(fetcher(Resolver({}), timeout_s=1.0).fetch(site.url("/slow.png")))
        assert "within 1 s" in err.message and err.code == "image_url_timeout"
        assert time.monotonic() - t0 < 3


def test_slow_redirect_chains_share_one_deadline():
    with image_site() as site:
        site.add_slow("/never", 5)
        for i in range(3):
            def hop(h, i=i) -> None:
                time.sleep(0.4)
                h.send_response(302)
                h.send_header("Location", f"/hop{i + 1}" if i < 2 else "/never")
                h.send_header("Content-Length", "0")
                h.end_headers()
            site.routes[f"/hop{i}"] = hop
        t0 = time.monotonic()
        err = refused(fetcher(Resolver({}), timeout_s=1.0, max_redirects=5).fetch(site.url("/hop0")))
        assert "within 1 s" in err.message and time.monotonic() - t0 < 3


def test_endless_bodies_are_cut_at_the_byte_limit():
    with image_site() as site:
        site.routes["/endless.png"] = _endless(b"\0" * 65536)
        t0 = time.monotonic()
        err = refused(fetcher(Resolver({}), max_bytes=500_000).fetch(site.url("/endless.png")), 413)
        assert "at most 500000 bytes" in err.message and time.monotonic() - t0 < 5


def test_declared_huge_bodies_are_refused_before_reading():
    with image_site() as site:
        def liar(h) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(10**12))
            h.end_headers()
            h.wfile.write(b"\x89PNG")
            h.close_connection = True
        site.routes["/huge.png"] = liar
        assert "too large" in refused(fetcher(Resolver({})).fetch(site.url("/huge.png")), 413).message


def test_short_bodies_and_dropped_connections_are_400():
    with image_site() as site:
        def short(h) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "5000")
            h.end_headers()
            h.wfile.write(b"\x89PNG\r\n")
            h.close_connection = True
        site.routes["/short.png"] = short
        err = refused(fetcher(Resolver({})).fetch(site.url("/short.png")))
        assert "could not be read" in err.message


# --- through the API: content types, limits, no traffic to forbidden places ------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    server = start_server(dev_settings(tmp_path_factory.mktemp("links"), api_keys=KEY, image_fetch_timeout_s=1.5,
                                       max_image_bytes=300_000))
    yield server
    server.stop()


def _use_site_only(server, dns: Resolver) -> None:
    """The server's link fetcher, with a fake DNS and the test site as the only reachable address."""
    settings = server.app.state.server.settings
    server.app.state.server.fetcher = LinkFetcher(max_bytes=settings.max_image_bytes, timeout_s=1.5,
                                                  max_redirects=3, resolver=dns, address_allowed=ONLY_TEST_SITE)


def _edit(server, url: str) -> httpx.Response:
    return httpx.post(server.api + "/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "prompt": "p", "image": url, "steps": 1, "response_format": "b64_json"})


def test_content_type_is_ignored_the_bytes_decide(api):
    with image_site() as site:
        _use_site_only(api, Resolver({"img.test": ["127.0.0.1"]}))
        site.add_bytes("/disguised.html", png_bytes(), "text/html")
        site.add_bytes("/fake.png", b"<!doctype html><p>not an image</p>", "image/png")
        site.add_bytes("/json.png", b'{"error": "nope"}', "application/json")
        assert _edit(api, f"http://img.test:{site.port}/disguised.html").status_code == 200
        for path in ("/fake.png", "/json.png"):
            r = _edit(api, f"http://img.test:{site.port}{path}")
            assert r.status_code == 400 and "not a PNG, JPEG or WebP" in r.json()["error"]["message"]


def test_api_refuses_hostile_links_within_limits(api):
    with image_site() as site:
        dns = Resolver({"img.test": ["127.0.0.1"], **FORBIDDEN_NAMES})
        _use_site_only(api, dns)
        site.routes["/slow.png"] = _slow_loris(0.1, headers=False)
        site.routes["/endless.png"] = _endless(b"\0" * 65536)
        site.add_redirect("/to-metadata", "http://metadata.google.internal/computeMetadata/v1/")
        cases = [("/slow.png", 400, "within 1.5 s"), ("/endless.png", 413, "at most 300000 bytes"),
                 ("/to-metadata", 400, "non-public")]
        for path, status, fragment in cases:
            t0 = time.monotonic()
            r = _edit(api, f"http://img.test:{site.port}{path}")
            assert r.status_code == status and fragment in r.json()["error"]["message"], (path, r.text)
            assert time.monotonic() - t0 < 6
        hits_before = len(site.hits)
        for url in ("http://metadata.google.internal/", "http://lan.test/x.png", "http://[::1]:8000/v1/models"):
            r = _edit(api, url)
            assert r.status_code == 400 and "non-public" in r.json()["error"]["message"]
        assert len(site.hits) == hits_before
        assert httpx.get(api.base_url + "/ready").status_code == 200


def test_links_inside_data_and_wrong_schemes_through_the_api(api):
    r = _edit(api, "data:text/html;base64," + base64.b64encode(b"<script>alert(1)</script>").decode())
    assert r.status_code == 400 and "not a PNG, JPEG or WebP" in r.json()["error"]["message"]
    for url in ("ftp://example.test/a.png", "file:///etc/passwd", "javascript:alert(1)//"):
        r = _edit(api, url)
        assert r.status_code == 400, url
