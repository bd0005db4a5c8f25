"""Fetching `image` links without becoming a proxy into the server's network (SSRF).

Rules: http(s) only; the host is resolved once, every resolved address must be public (no loopback, private,
link-local — which holds the cloud metadata address —, shared, reserved, multicast, or an IPv6 form embedding
one of those), and the connection goes to the checked address itself (Host header and TLS SNI keep the name),
so DNS cannot answer differently between check and fetch. Redirects are followed by hand, each hop checked the
same way; bodies are streamed with a byte cap and the whole fetch has a deadline. Environment proxies are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import APIError, bad_request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for `host` (run off the event loop by asyncio)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses; IPv6 forms that embed an IPv4 address are judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id or ip.teredo:  # Teredo tunnels lead anywhere: refused outright
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    return bool(ip.is_global) and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                       or ip.is_reserved or ip.is_unspecified)


async def check_host(host: str, port: int, resolver: Resolver,
                     allowed: Callable[[IPAddress], bool] = is_public_address) -> str:
    """Resolve `host` and return the address to connect to; 400 when any resolved address is not `allowed`."""
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise bad_request(f"'image' link host '{host}' could not be resolved ({exc})",
                              code="invalid_image_url") from None
    if not addresses:
        raise bad_request(f"'image' link host '{host}' could not be resolved", code="invalid_image_url")
    for addr in addresses:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise bad_request(f"'image' link host '{host}' resolved to an invalid address",
                              code="invalid_image_url") from None
        if not allowed(ip):
            raise bad_request(
                f"'image' link host '{host}' resolves to a non-public address ({addr}); links to loopback, "
                "private, link-local and metadata addresses are refused", code="forbidden_image_url")
    return addresses[0]


def _split(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad_request("'image' link is not a valid URL", code="invalid_image_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad_request(f"'image' link scheme '{scheme}' is not allowed: only http and https links are fetched",
                          code="invalid_image_url")
    host = parts.hostname
    if not host:
        raise bad_request("'image' link has no host", code="invalid_image_url")
    return scheme, host, port or (443 if scheme == "https" else 80)


class LinkFetcher:
    """Downloads one image link under the rules above.

    `allow_private` (a setting) lifts the address rule for trusted networks and tests; `resolver` and
    `address_allowed` let tests put names and policies in front of a local server without real DNS.
    """

    def __init__(self, *, max_bytes: int, timeout_s: float, max_redirects: int, allow_private: bool = False,
                 resolver: Resolver = system_resolver,
                 address_allowed: Callable[[IPAddress], bool] | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.allowed = address_allowed or ((lambda ip: True) if allow_private else is_public_address)

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise bad_request(f"'image' link could not be fetched within {self.timeout_s:g} s",
                              code="image_url_timeout") from None

    async def _fetch(self, url: str) -> bytes:
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            for _hop in range(self.max_redirects + 1):
                scheme, host, port = _split(url)
                address = await check_host(host, port, self.resolver, self.allowed)
                ip_host = f"[{address}]" if ":" in address else address
                parts = urlsplit(url)
                target = f"{scheme}://{ip_host}:{port}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
                name = f"[{host}]" if ":" in host else host
                host_header = name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"
                request = client.build_request(
                    "GET", target, headers={"Host": host_header, "Accept-Encoding": "identity",
                             "Accept": "image/png,image/jpeg,image/webp,*/*;q=0.1"},
                    extensions={"sni_hostname": host} if scheme == "https" else {})
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise bad_request(f"'image' link could not be fetched: {type(exc).__name__}",
                                      code="image_url_unreachable") from None
                try:
                    if response.status_code in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            raise bad_request("'image' link redirected without a Location", code="image_url_failed")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"'image' link returned HTTP {response.status_code}", code="image_url_failed")
                    return await self._read_capped(response)
                finally:
                    await response.aclose()
        raise bad_request(f"'image' link redirected more than {self.max_redirects} times", code="image_url_failed")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        too_large = APIError(413, f"'image' link is too large: at most {self.max_bytes} bytes", code="image_too_large")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > self.max_bytes:
                    raise too_large
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise bad_request(f"'image' link could not be read: {type(exc).__name__}",
                              code="image_url_unreachable") from None
        return b"".join(chunks)
