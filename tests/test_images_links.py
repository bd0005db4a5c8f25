"""Image links (`api/links.py`): the address rule on resolved addresses (fake resolver, no traffic), and real
fetches from a local web server that the tests start (loopback explicitly allowed for them)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import image_site, png_bytes  # noqa: E402

from step1x_edit.api.errors import APIError  # noqa: E402
from step1x_edit.api.links import LinkFetcher, check_host, is_public_address  # noqa: E402


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "169.254.1.1",
    "100.64.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3",
    "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:7f00:1::", "2001:db8::1", "2001::7f00:1",
])
def test_non_public_addresses_are_refused(addr):
    assert not is_public_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                                  "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(addr):
    assert is_public_address(ipaddress.ip_address(addr))


def _resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]
    return resolve


def _run(coro):
    return asyncio.run(coro)


def test_check_uses_the_resolved_address_not_the_name():
    resolver = _resolver({"images.example.com": ["93.184.216.34"], "sneaky.example.com": ["169.254.169.254"],
                          "mixed.example.com": ["93.184.216.34", "10.0.0.7"], "v6.example.com": ["::1"]})
    assert _run(check_host("images.example.com", 80, resolver)) == "93.184.216.34"
    for host, addr in [("sneaky.example.com", "169.254.169.254"), ("mixed.example.com", "10.0.0.7"),
                       ("v6.example.com", "::1")]:
        with pytest.raises(APIError) as exc:
            _run(check_host(host, 80, resolver))
        assert exc.value.status == 400 and host in exc.value.message and addr in exc.value.message
        assert "non-public" in exc.value.message


@pytest.mark.parametrize("literal", ["127.0.0.1", "10.1.1.1", "::1", "169.254.169.254"])
def test_literal_addresses_are_checked_without_resolving(literal):
    calls: list[str] = []
    with pytest.raises(APIError) as exc:
        _run(check_host(literal, 80, _resolver({}, calls)))
    assert exc.value.status == 400 and calls == []


def test_unresolvable_host_is_400():
    with pytest.raises(APIError) as exc:
        _run(check_host("nowhere.invalid", 80, _resolver({})))
    assert exc.value.status == 400 and "could not be resolved" in exc.value.message


def _fetcher(**kw) -> LinkFetcher:
    args = dict(max_bytes=100_000, timeout_s=5, max_redirects=2, allow_private=True)
    args.update(kw)
    return LinkFetcher(**args)


def _refused(coro, status=400) -> APIError:
    with pytest.raises(APIError) as exc:
        _run(coro)
    assert exc.value.status == status, exc.value.message
    return exc.value


@pytest.mark.parametrize("url,fragment", [
    ("http://127.0.0.1:1/a.png", "non-public"),
    ("http://localhost/a.png", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://[::1]:8080/a.png", "non-public"),
    ("http://10.0.0.1/a.png", "non-public"),
    ("ftp://example.com/a.png", "scheme 'ftp'"),
    ("http:///nohost", "no host"),
])
def test_default_fetcher_refuses_before_connecting(url, fragment):
    fetcher = _fetcher(allow_private=False, resolver=_resolver({"localhost": ["127.0.0.1"]}))
    err = _refused(fetcher.fetch(url))
    assert fragment in err.message


def test_fetch_from_local_server_and_host_header_kept():
    body = png_bytes()
    with image_site() as site:
        site.add_bytes("/cat.png", body)
        calls: list[str] = []
        # The name resolves to the test server once; the connection goes to that checked address.
        fetcher = _fetcher(resolver=_resolver({"images.test": ["127.0.0.1"]}, calls))
        assert _run(fetcher.fetch(f"http://images.test:{site.port}/cat.png")) == body
        assert calls == ["images.test"]
        assert site.hits[-1] == ("/cat.png", f"images.test:{site.port}")


def test_redirects_are_followed_and_each_hop_rechecked():
    body = png_bytes()
    with image_site() as site:
        site.add_bytes("/real.png", body)
        site.add_redirect("/hop1", "/hop2")
        site.add_redirect("/hop2", f"http://images.test:{site.port}/real.png", 301)
        site.add_redirect("/to-metadata", "http://metadata.test/latest/meta-data/")
        site.add_redirect("/loop", "/loop")
        resolver = _resolver({"images.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]})
        # Only the test server's address is allowed: a redirect elsewhere must be refused before any connection.
        only_test_server = lambda ip: str(ip) == "127.0.0.1"  # noqa: E731
        fetcher = _fetcher(resolver=resolver, address_allowed=only_test_server)
        assert _run(fetcher.fetch(site.url("/hop1"))) == body
        err = _refused(fetcher.fetch(site.url("/to-metadata")))
        assert "169.254.169.254" in err.message
        err = _refused(fetcher.fetch(site.url("/loop")))
        assert "redirected more than 2 times" in err.message


def test_http_errors_and_unreachable_hosts_are_400():
    with image_site() as site:
        err = _refused(_fetcher().fetch(site.url("/missing.png")))
        assert "HTTP 404" in err.message
    err = _refused(_fetcher().fetch(f"http://127.0.0.1:{site.port}/gone.png"))  # server closed
    assert "could not be fetched" in err.message


def test_size_cap_with_and_without_content_length():
    big = os.urandom(300_000)
    with image_site() as site:
        site.add_bytes("/big.png", big)
        site.add_bytes("/big-stream.png", big, length=False)
        site.add_bytes("/ok.png", big[:50_000], length=False)
        fetcher = _fetcher()
        assert "too large" in _refused(fetcher.fetch(site.url("/big.png")), 413).message
        assert "too large" in _refused(fetcher.fetch(site.url("/big-stream.png")), 413).message
        assert _run(fetcher.fetch(site.url("/ok.png"))) == big[:50_000]


def test_slow_server_times_out():
    with image_site() as site:
        site.add_slow("/slow.png", 3)
        err = _refused(_fetcher(timeout_s=0.5).fetch(site.url("/slow.png")))
        assert "within 0.5 s" in err.message
