"""SSRF guard for outgoing requests to URLs users give: check a URL's resolved addresses, then connect only to a
checked one.

The gateway calls `SsrfPolicy.check_url` when a webhook endpoint is registered or its URL changes; the
notifier (and the gateway's `test` call) send through `GuardedHttpClient`, which resolves and checks
again at connect time and connects to the checked IP itself (Host header and TLS SNI keep the original
name), so a DNS answer that changes between the check and the connection cannot reach a refused address.
The run orchestrator GETs the images messages link to the same way (for model servers that take only data URLs),
each redirect's URL checked again.
"""

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urljoin, urlsplit

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
    """The URL is not acceptable to send a request to (scheme, host, or a refused address)."""


@dataclass(frozen=True)
class CheckedTarget:
    """A URL whose host resolved to addresses that are all allowed; `addresses` in resolver order."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    parts: SplitResult


def parse_networks(value: str | Iterable[str], setting: str = "THREADLINE_WEBHOOK_ALLOWED_NETWORKS"
                   ) -> tuple[IPNetwork, ...]:
    """Parse an allowed-networks `setting` (comma/space separated CIDRs or single addresses)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    networks: list[IPNetwork] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid network in {setting}: {item!r}") from exc
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
    def from_setting(cls, allowed: str, *, setting: str = "THREADLINE_WEBHOOK_ALLOWED_NETWORKS",
                     resolver: Resolver = system_resolver) -> "SsrfPolicy":
        """Build from the value of an allowed-networks `setting` (THREADLINE_WEBHOOK_ALLOWED_NETWORKS, ...)."""
        return cls(parse_networks(allowed, setting), resolver=resolver)

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


@dataclass(frozen=True)
class HttpResponse:
    """The answer to a guarded request: the URL that gave it (the last of any redirects), its status, its headers
    (names in lower case) and its body."""

    url: str
    status_code: int
    headers: dict[str, str]
    content: bytes


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
"""The statuses a guarded GET follows to their `Location`."""


class HttpFetchError(Exception):
    """A guarded GET that brought no answer to use (timeout, connection, TLS, a broken response, endless redirects)."""


class ResponseTooLarge(HttpFetchError):
    """A guarded GET whose body is larger than the caller takes: an error, as a body cut short would be another one."""


class _ResponseError(Exception):
    """The peer broke HTTP/1.1 framing or closed the connection early (`answered`: it did send something)."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass
class _Connection:
    """One pooled keep-alive connection to a checked address."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


_PoolKey = tuple[str, str, int, str]  # scheme, checked IP, port, host name (TLS sessions never cross names)


class GuardedHttpClient:
    """Requests to checked addresses only: re-resolves at send time and connects to the address it checked.

    A lean HTTP/1.1 client on asyncio streams (webhooks need POST, a status, a few headers and the start
    of the body; fetched images a GET of a whole, bounded body): keep-alive pools per (scheme, IP, port, host name);
    TLS verifies the certificate against the URL's host name, which is also the SNI and the Host header; a POST's
    redirect is not followed, a GET's is (each new URL checked).
    """

    def __init__(self, policy: SsrfPolicy, *, user_agent: str = "Threadline-Webhooks/1.0",
                 max_idle_per_target: int = 16, idle_seconds: float = 4.0) -> None:
        self.policy = policy
        self._user_agent = user_agent
        self._max_idle = max_idle_per_target
        self._idle_seconds = idle_seconds
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._next_prune = 0.0
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def aclose(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _take(self, key: _PoolKey) -> _Connection | None:
        now = time.monotonic()
        self._prune(now)
        connections = self._idle.get(key)
        found: _Connection | None = None
        while connections and found is None:
            connection = connections.pop()
            if now - connection.idle_since < self._idle_seconds and not connection.reader.at_eof():
                found = connection
            else:
                connection.close()
        if not connections:
            self._idle.pop(key, None)
        return found

    def _prune(self, now: float) -> None:
        """Close the connections idle too long at every target, once per `idle_seconds`: a target never posted to
        again (its endpoint deleted or moved) otherwise kept its sockets open for the life of the process."""
        if now < self._next_prune:
            return
        self._next_prune = now + self._idle_seconds
        for key, connections in list(self._idle.items()):
            fresh = [c for c in connections if now - c.idle_since < self._idle_seconds]
            for connection in connections:
                if now - connection.idle_since >= self._idle_seconds:
                    connection.close()
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    def _give_back(self, key: _PoolKey, connection: _Connection) -> None:
        connections = self._idle.setdefault(key, [])
        if len(connections) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        connections.append(connection)

    async def _open(self, target: CheckedTarget, ip: IPAddress, server_name: str) -> _Connection:
        tls = self._tls_context() if target.scheme == "https" else None
        reader, writer = await asyncio.open_connection(str(ip), target.port, ssl=tls,
                                                       server_hostname=server_name if tls else None,
                                                       limit=1 << 16)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str], time_limit: float,
                   max_response_bytes: int = 1024) -> HttpResult:
        """Check, connect to the checked IP, POST, read at most `max_response_bytes` of the answer."""
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000.0

        try:
            async with asyncio.timeout(time_limit):
                target = await self.policy.check_url(url)
                answer = await self._exchange("POST", target, content, headers, max_response_bytes, whole=False)
        except _EXCHANGE_FAILURES as exc:
            return HttpResult(None, elapsed(), _failure_text(exc, time_limit), "", None)
        retry_after = None
        if answer.status_code in (429, 503):
            retry_after = parse_retry_after(answer.headers.get("retry-after"))
        return HttpResult(status_code=answer.status_code, latency_ms=elapsed(), error=None,
                          response_excerpt=answer.content.decode("utf-8", "replace"), retry_after=retry_after)

    async def get(self, url: str, *, time_limit: float, max_bytes: int, headers: Mapping[str, str] | None = None,
                  max_redirects: int = 5) -> HttpResponse:
        """Check, connect to the checked IP, GET the whole body (at most `max_bytes`), following redirects (each new
        URL checked again). Any status is an answer; raises SsrfError for a refused URL (the first or a redirect's),
        ResponseTooLarge for a body over `max_bytes`, HttpFetchError for anything else that left no answer."""
        try:
            async with asyncio.timeout(time_limit):
                for _ in range(max_redirects + 1):
                    target = await self.policy.check_url(url)
                    answer = await self._exchange("GET", target, b"", headers or {}, max_bytes, whole=True)
                    location = answer.headers.get("location")
                    if answer.status_code not in REDIRECT_STATUSES or not location:
                        return HttpResponse(url=url, status_code=answer.status_code, headers=answer.headers,
                                            content=answer.content)
                    url = urljoin(url, location)
                raise HttpFetchError(f"more than {max_redirects} redirects")
        except (SsrfError, HttpFetchError):
            raise
        except _EXCHANGE_FAILURES as exc:
            raise HttpFetchError(_failure_text(exc, time_limit)) from exc

    async def _exchange(self, method: str, target: CheckedTarget, content: bytes, headers: Mapping[str, str],
                        max_bytes: int, *, whole: bool) -> HttpResponse:
        """One request to the checked address on a pooled connection (a fresh one when a kept-alive one turns out
        closed), its answer read as `_read_response` reads it."""
        ip = target.addresses[0]
        server_name = _ascii_host(target.host)
        key: _PoolKey = (target.scheme, str(ip), target.port, server_name)
        request = self._request(method, target, server_name, content, headers)
        for fresh in (False, True):
            connection = None if fresh else self._take(key)
            reused = connection is not None
            if connection is None:
                connection = await self._open(target, ip, server_name)
            try:
                connection.writer.write(request)
                await connection.writer.drain()
                status, response_headers, body, reusable = await _read_response(connection.reader, max_bytes,
                                                                                 whole=whole)
            except BaseException as exc:
                connection.close()
                if (reused and isinstance(exc, _ResponseError | ConnectionError)
                        and not (isinstance(exc, _ResponseError) and exc.answered)):
                    continue  # a kept-alive connection the server had closed: once more, fresh
                raise
            if reusable:
                self._give_back(key, connection)
            else:
                connection.close()
            return HttpResponse(url=target.url, status_code=status, headers=response_headers, content=body)
        raise _ResponseError("the connection was closed before a response")  # not reached

    def _request(self, method: str, target: CheckedTarget, server_name: str, content: bytes,
                 headers: Mapping[str, str]) -> bytes:
        """The request head and body; header values come from us (signatures), never from the URL."""
        default_port = 443 if target.scheme == "https" else 80
        host = f"[{server_name}]" if ":" in server_name else server_name
        if target.parts.port is not None and target.port != default_port:
            host = f"{host}:{target.port}"
        path = quote(target.parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if target.parts.query:
            path += "?" + quote(target.parts.query, safe="/%:@!$&'()*+,;=-._~?")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"User-Agent: {self._user_agent}",
                 *([f"Content-Length: {len(content)}"] if content or method != "GET" else []), "Connection: keep-alive"]
        for name, value in headers.items():
            if name.lower() in ("host", "content-length", "connection", "transfer-encoding"):
                continue
            if any(ch in f"{name}{value}" for ch in "\r\n\0"):
                raise ValueError(f"invalid header {name!r}")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


_EXCHANGE_FAILURES = (SsrfError, TimeoutError, ssl.SSLError, OSError, _ResponseError)
"""What a request may fail with short of an answer (`_failure_text` says each)."""


def _failure_text(exc: BaseException, time_limit: float) -> str:
    """Why a request got no answer, in words for a delivery's or a fetch's error."""
    if isinstance(exc, SsrfError):
        return f"refused: {exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out after {time_limit:g}s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, _ResponseError):
        return f"invalid HTTP response: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _ascii_host(host: str) -> str:
    """The host as it goes on the wire (IDNA for names; IPv6 literals without brackets)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return host.rstrip(".").encode("idna").decode("ascii").lower()


async def _read_response(reader: asyncio.StreamReader, limit: int, *,
                         whole: bool) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, the body, and whether the connection can be reused. The body is cut to `limit` bytes, or with
    `whole` read to its end: ResponseTooLarge past `limit`, _ResponseError when the peer breaks off or garbles it."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise _ResponseError("the connection was closed before a response") from exc
        except asyncio.LimitOverrunError as exc:
            raise _ResponseError("response headers too large", answered=True) from exc
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _ResponseError(f"bad status line {lines[0][:80]!r}", answered=True)
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            continue  # interim response (100 Continue, 103 Early Hints): the final one follows
        break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if status in (204, 304) or status < 200:
        return status, headers, b"", keep_alive

    def over_limit(size: int) -> bool:
        if whole and size > limit:
            raise ResponseTooLarge(f"the response body is larger than {limit} bytes")
        return size > limit

    body = bytearray()
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return status, headers, bytes(body[:limit]), keep_alive
                if over_limit(len(body) + size):
                    body += await reader.readexactly(max(0, limit - len(body)))
                    return status, headers, bytes(body), False  # not drained: do not reuse
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            wanted = int(length)
            over_limit(wanted)
            body += await reader.readexactly(min(wanted, limit))
            return status, headers, bytes(body), keep_alive and wanted <= limit
        cap = limit + 1 if whole else limit  # delimited by the end of the connection: one byte more says it is over
        while len(body) < cap:
            chunk = await reader.read(cap - len(body))
            if not chunk:
                break
            body += chunk
        over_limit(len(body))
        return status, headers, bytes(body), False
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        if whole:
            raise _ResponseError("the body was cut short or malformed", answered=True) from exc
        return status, headers, bytes(body[:limit]), False
