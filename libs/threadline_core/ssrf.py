"""SSRF guard for outgoing webhooks: check a URL's resolved addresses, then connect only to a checked one.

The gateway calls `SsrfPolicy.check_url` when an endpoint is registered or its URL changes; the
notifier (and the gateway's `test` call) send through `GuardedHttpClient`, which resolves and checks
again at connect time and connects to the checked IP itself (Host header and TLS SNI keep the original
name), so a DNS answer that changes between the check and the connection cannot reach a refused address.
"""

import asyncio
import collections
import contextlib
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

CLOUD_METADATA = frozenset({
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
})
"""Instance-metadata addresses: refused even when an allowed network contains them."""

_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)


class SsrfError(ValueError):
    """The URL is not acceptable as a webhook target (scheme, host, or a refused address)."""


@dataclass(frozen=True)
class CheckedTarget:
    """A URL whose host resolved to addresses that are all allowed; `addresses` in resolver order."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    parts: SplitResult


def parse_networks(value: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse `THREADLINE_WEBHOOK_ALLOWED_NETWORKS` (comma/space separated CIDRs or single addresses)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    networks: list[IPNetwork] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid network in THREADLINE_WEBHOOK_ALLOWED_NETWORKS: {item!r}") from exc
    return tuple(networks)


def _canonical(address: IPAddress) -> IPAddress:
    """Judge IPv4 carried inside IPv6 (::ffff:10.0.0.1, NAT64 64:ff9b::a00:1) as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # NAT64 of an IPv4 address
    return address


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the OS resolver (getaddrinfo) without blocking the loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        if addr not in seen:
            seen.append(addr)
    return seen


class SsrfPolicy:
    """Which addresses a webhook may reach: public unicast only, plus operator-allowed networks."""

    def __init__(self, allowed_networks: Sequence[IPNetwork] = (), *, resolver: Resolver = system_resolver,
                 allowed_schemes: Sequence[str] = ("http", "https")) -> None:
        self.allowed_networks = tuple(allowed_networks)
        self._resolver = resolver
        self._schemes = tuple(allowed_schemes)
        self._refused = tuple((ipaddress.ip_network(cidr), why) for cidr, why in _REFUSED)

    @classmethod
    def from_setting(cls, allowed: str, *, resolver: Resolver = system_resolver) -> "SsrfPolicy":
        """Build from the `THREADLINE_WEBHOOK_ALLOWED_NETWORKS` value."""
        return cls(parse_networks(allowed), resolver=resolver)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why this address is refused (None when allowed)."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return "not an IP address"
        ip = _canonical(ip)
        if ip in CLOUD_METADATA:
            return "cloud metadata service"
        if any(ip in net for net in self.allowed_networks if net.version == ip.version):
            return None
        for net, why in self._refused:
            if net.version == ip.version and ip in net:
                return why
        if ip.is_multicast:
            return "multicast"
        if not ip.is_global:
            return "not globally routable"
        return None

    def parse_url(self, url: str) -> SplitResult:
        """Syntax checks only: absolute http(s) URL with a host, no fragment."""
        if not url or len(url) > 2048:
            raise SsrfError("The URL must be between 1 and 2048 characters.")
        if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
            raise SsrfError("The URL must not contain whitespace or control characters.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SsrfError(f"The URL is not valid: {exc}.") from exc
        if parts.scheme.lower() not in self._schemes:
            raise SsrfError(f"The URL scheme must be one of {', '.join(self._schemes)}.")
        if not parts.hostname:
            raise SsrfError("The URL must include a host.")
        if port == 0:
            raise SsrfError("The URL port must not be 0.")
        return parts

    async def check_url(self, url: str) -> CheckedTarget:
        """Resolve the URL's host and require every address to be allowed (raise SsrfError otherwise)."""
        parts = self.parse_url(url)
        host = parts.hostname or ""
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            raw = [str(literal)]
        else:
            try:
                raw = await self._resolver(host.rstrip(".").encode("idna").decode("ascii"), port)
            except (OSError, UnicodeError) as exc:
                raise SsrfError(f"The URL host {host!r} could not be resolved.") from exc
        if not raw:
            raise SsrfError(f"The URL host {host!r} did not resolve to any address.")
        addresses: list[IPAddress] = []
        for item in raw:
            try:
                ip = ipaddress.ip_address(item)
            except ValueError as exc:
                raise SsrfError(f"The URL host {host!r} resolved to an invalid address.") from exc
            why = self.refusal(ip)
            if why is not None:
                raise SsrfError(f"The URL host {host!r} resolves to {ip}, which is not allowed ({why}).")
            addresses.append(ip)
        return CheckedTarget(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses), parts=parts)


@dataclass(frozen=True)
class HttpResult:
    """The outcome of one guarded POST (status None when no HTTP response arrived)."""

    status_code: int | None
    latency_ms: float
    error: str | None
    response_excerpt: str
    retry_after: float | None

    @property
    def success(self) -> bool:
        """2xx means delivered."""
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _host_for_url(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


class GuardedHttpClient:
    """POSTs to checked addresses only: re-resolves at send time and pins the connection to that IP."""

    def __init__(self, policy: SsrfPolicy, *, user_agent: str = "Threadline-Webhooks/1.0",
                 max_clients: int = 256) -> None:
        self.policy = policy
        self._user_agent = user_agent
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[str, httpx.AsyncClient] = collections.OrderedDict()

    def _client_for(self, host: str) -> httpx.AsyncClient:
        """One connection pool per target host name, so TLS sessions never cross virtual hosts."""
        client = self._clients.get(host)
        if client is not None:
            self._clients.move_to_end(host)
            return client
        client = httpx.AsyncClient(trust_env=False, follow_redirects=False, http2=False,
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=16,
                                                       keepalive_expiry=30.0))
        self._clients[host] = client
        while len(self._clients) > self._max_clients:
            _, old = self._clients.popitem(last=False)
            task = asyncio.ensure_future(old.aclose())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return client

    async def aclose(self) -> None:
        """Close every pooled connection."""
        clients, self._clients = list(self._clients.values()), collections.OrderedDict()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str], time_limit: float,
                   max_response_bytes: int = 1024) -> HttpResult:
        """Check, connect to the checked IP, POST, read at most `max_response_bytes` of the answer."""
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000.0

        try:
            async with asyncio.timeout(time_limit):
                target = await self.policy.check_url(url)
                ip = target.addresses[0]
                default_port = 443 if target.scheme == "https" else 80
                netloc = _host_for_url(ip) + ("" if target.port == default_port else f":{target.port}")
                pinned = urlunsplit((target.scheme, netloc, target.parts.path or "/", target.parts.query, ""))
                host_header = target.parts.netloc.rsplit("@", 1)[-1]
                request_headers = {"user-agent": self._user_agent, **headers, "host": host_header}
                extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
                client = self._client_for(target.host.lower())
                request = client.build_request("POST", pinned, content=content, headers=request_headers,
                                               extensions=extensions, timeout=time_limit)
                response = await client.send(request, stream=True)
                try:
                    excerpt = bytearray()
                    async for chunk in response.aiter_raw():
                        excerpt.extend(chunk)
                        if len(excerpt) >= max_response_bytes:
                            break
                finally:
                    await response.aclose()
                retry_after = None
                if response.status_code in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                return HttpResult(status_code=response.status_code, latency_ms=elapsed(), error=None,
                                  response_excerpt=bytes(excerpt[:max_response_bytes]).decode("utf-8", "replace"),
                                  retry_after=retry_after)
        except SsrfError as exc:
            return HttpResult(None, elapsed(), f"refused: {exc}", "", None)
        except TimeoutError:
            return HttpResult(None, elapsed(), f"timed out after {time_limit:g}s", "", None)
        except httpx.HTTPError as exc:
            return HttpResult(None, elapsed(), f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                              "", None)
        except OSError as exc:
            return HttpResult(None, elapsed(), f"{type(exc).__name__}: {exc}", "", None)
