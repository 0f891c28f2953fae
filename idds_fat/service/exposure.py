"""Who may talk to the service: the token rule, and the Host and Origin checks.

Three locks, each against its own attacker:

- the bearer token (checked in :mod:`idds_fat.service.app`): anyone who can
  open a connection, on the network or another user of the machine. Always
  set: the embedded service makes one, ``idds-fat serve`` refuses to start
  without one, and a token must pass :func:`check_token`;
- the ``Host`` check (:class:`HostPolicy`): a web page that renames itself to
  a loopback address (DNS rebinding) speaks to the service under the page's
  own host name, which the service does not answer to (421);
- the ``Origin`` check: a web page of another origin posting to the service
  (a cross-origin ``text/plain`` POST needs no CORS preflight). Requests that
  change something, and every ``/api`` request, are refused (403) when the
  browser says they come from another origin or site.

:class:`RequestOriginCheck` applies the last two to every HTTP request,
before any route runs.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: A token must have at least this many characters (16 random bytes in url-safe base64).
MIN_TOKEN_CHARS = 22
#: ... of which at least this many different ones (rules out ``aaaa…`` and ``1111…``).
MIN_DISTINCT_CHARS = 10
#: The rule, as errors state it.
TOKEN_RULE = (
    f"a token needs at least {MIN_TOKEN_CHARS} characters, at least "
    f"{MIN_DISTINCT_CHARS} of them different (16 random bytes or more, e.g. "
    "`idds-fat token` or python -c 'import secrets; print(secrets.token_urlsafe(32))')"
)

# Methods that cannot change anything: only these go unchecked outside /api.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request the page made itself, or the user typed.
_OWN_FETCH_SITES = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def generate_token() -> str:
    """Return a new random token (32 bytes, url-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def check_token(token: str | None) -> str:
    """Return ``token`` if it is strong enough (:data:`TOKEN_RULE`).

    Raises:
        ValueError: ``token`` is missing, too short, or has too few different
            characters; the message states the rule, never the token.
    """
    if not token:
        raise ValueError(f"no token given: {TOKEN_RULE}")
    if len(token) < MIN_TOKEN_CHARS or len(set(token)) < MIN_DISTINCT_CHARS:
        raise ValueError(
            f"the token is too weak ({len(token)} characters, {len(set(token))} different): "
            + TOKEN_RULE
        )
    return token


def is_loopback(host: str) -> bool:
    """Return whether ``host`` (an address or ``localhost``) only reaches this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere


def split_host(value: str) -> tuple[str, int | None]:
    """Split a ``Host`` header (``name``, ``name:port``, ``[v6]:port``) into a
    lower-case host without a trailing dot and the port (``None`` when absent).

    Raises:
        ValueError: the port is not a number.
    """
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad host {value!r}")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""  # a bare IPv6 address has colons but no port
    if port and not port.isdigit():
        raise ValueError(f"bad port in {value!r}")
    return host.lower().rstrip("."), int(port) if port else None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The ``Host`` headers a service answers to.

    Loopback names and addresses always; ``names`` besides (lower case); and,
    with ``any_address``, any IP address: a browser page that names an address
    cannot rebind it, so addresses are safe for a service reachable by address
    from other machines.
    """

    names: frozenset[str] = field(default_factory=frozenset)
    any_address: bool = False

    @classmethod
    def for_listener(cls, host: str, public_hosts: Iterable[str] = ()) -> HostPolicy:
        """Return the policy of a service listening on ``host`` and reached as
        ``public_hosts`` (names or URLs).

        A loopback listener answers to loopback names and ``public_hosts`` only;
        one beyond loopback also to this machine's names (``hostname``, its fully
        qualified name), the listening name, and any IP address.
        """
        names = {_host_of(name) for name in public_hosts if name}
        if is_loopback(host):
            return cls(frozenset(names))
        names |= {_host_of(socket.gethostname()), _host_of(socket.getfqdn())}
        if not _is_address(host.strip("[]")) and host not in ("", "*"):
            names.add(_host_of(host))
        return cls(frozenset(n for n in names if n), any_address=True)

    def allows(self, host_header: str | None) -> bool:
        """Return whether a request with this ``Host`` header (``None``: none) is answered."""
        if not host_header:
            return False
        try:
            host, _ = split_host(host_header)
        except ValueError:
            return False
        if is_loopback(host) or host in self.names:
            return True
        return self.any_address and _is_address(host)


def _host_of(name: str) -> str:
    """The lower-case host of ``name``: a host name, ``host:port`` or a URL."""
    if "//" in name:
        name = urlsplit(name).netloc.rpartition("@")[2]
    try:
        return split_host(name)[0]
    except ValueError:
        return name.lower()


def same_origin(origin: str, host_header: str) -> bool:
    """Return whether the ``Origin`` header names the origin the ``Host`` header reached.

    The scheme is not known behind a TLS proxy, so a ``Host`` without a port
    matches an origin on its scheme's default port.
    """
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        host, port = split_host(host_header)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or (parts.hostname or "").rstrip(".") != host:
        return False
    return port == origin_port if port is not None else origin_port in _DEFAULT_PORTS.values()


class RequestOriginCheck:
    """ASGI middleware: 421 for a ``Host`` the :class:`HostPolicy` refuses, 403 for a
    state-changing or ``/api`` request whose ``Origin`` is another origin (or
    ``null``) or whose ``Sec-Fetch-Site`` is another site.

    Requests without those headers (``requests``, ``curl``, the wrapper) pass:
    browsers send them, and only browsers carry a foreign page's requests.
    """

    def __init__(self, app: ASGIApp, hosts: HostPolicy) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            await _refuse(send, 421, "this service does not answer to that Host header")
            return
        if scope["method"] not in _SAFE_METHODS or _is_api(scope["path"]):
            origin = headers.get(b"origin")
            if origin is not None and not same_origin(origin.decode("latin-1"), host):
                await _refuse(send, 403, "cross-origin request refused")
                return
            site = headers.get(b"sec-fetch-site")
            if site is not None and site not in _OWN_FETCH_SITES:
                await _refuse(send, 403, "cross-site request refused")
                return
        await self.app(scope, receive, send)


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
