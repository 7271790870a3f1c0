"""A lean status check: ``GET {base_url}/responses/{id}`` over aiohttp, mirroring the SDK.

A live job is polled many times. Through ``client.responses.retrieve()`` each poll costs the SDK's
request building, httpx2's machinery and a pydantic model; the bytes on the wire are the same
every time. :class:`LeanPoller` snapshots what the client would send for a GET (URL, default
query, headers, timeouts, TLS context) once, and sends exactly that through one aiohttp session.
It is for live polls only: creates, cancels and the final retrieve stay with the SDK, which owns
retries, error mapping and models.

GETs (the status checks) go over a transport of their own, :mod:`._lean_wire` (the request
written prebuilt on keep-alive connections, the answer read with httptools' C parser), wherever
it can send what aiohttp would (it decodes gzip and deflate only); POSTs, and GETs where it
cannot, go through the aiohttp session.

When the poller cannot promise the same request (a custom ``http_client``, per-request
credentials, proxies, another event loop library), :meth:`LeanPoller.for_client` returns ``None``
and the caller keeps polling through the SDK.

    LeanError               the lean GET failed; the SDK would have raised APIConnectionError
    ├── LeanConnectError    no connection: refused, DNS, TLS, connect timeout; nothing was sent
    └── LeanTransportError  the connection broke or timed out after the request was sent
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import quote

import httpx2
import openai
import sniffio

if TYPE_CHECKING:
    import ssl

    import aiohttp
    from openai._qs import Querystring

__all__ = [
    "LeanConnectError",
    "LeanError",
    "LeanPoller",
    "LeanTransportError",
    "RawAnswer",
    "read_status",
]

_log = logging.getLogger("asyncbg")

#: A path segment no SDK route uses; the SDK's own URL routing is asked where it would go.
_PROBE: Final = "asyncbg-lean-probe"
#: Characters a path may carry as they are: the SDK's ``path_template`` keeps RFC 3986 ``pchar``
#: (unreserved, sub-delims, ``:`` and ``@``) in a segment; ``/`` separates segments here.
_PATH_SAFE: Final = "!$&'()*+,;=:@/"
#: Headers the transport computes for itself (aiohttp writes the same Host httpx2 would) or that
#: belong to a cookie jar (each client keeps its own, as httpx2 does).
_TRANSPORT_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "cookie"})


class LeanError(Exception):
    """A lean status check failed on the network; the message names the URL."""


class LeanConnectError(LeanError):
    """No connection was made (refused, DNS, TLS, connect or pool timeout): nothing was sent.

    ``reason`` says why in a few words, for a user's one line: ``api.example:443: connection
    refused`` (the message adds the method and URL)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def connect_reason(exc: BaseException, host: str | None = None, port: int | None = None) -> str:
    """Why a connection could not be made, in one short line: ``HOST:PORT: connection
    refused``, the OS's own words without the libraries' reprs (aiohttp's carries its whole
    connection key). ``host`` and ``port`` when ``exc`` does not carry them (aiohttp's do)."""
    import errno
    import os
    import socket
    import ssl

    host = getattr(exc, "host", host)
    port = getattr(exc, "port", port)
    cause: BaseException = getattr(exc, "certificate_error", None) or getattr(
        exc, "os_error", None) or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        text = f"TLS certificate: {cause.verify_message or cause.reason or cause}"
    elif isinstance(cause, ssl.SSLError):
        text = f"TLS: {cause.reason or cause}"
    elif isinstance(exc, TimeoutError) or isinstance(cause, TimeoutError):
        text = "timed out"
    elif isinstance(cause, socket.gaierror):
        text = cause.strerror or str(cause)  # DNS: "Name or service not known"
    elif isinstance(cause, OSError) and cause.errno is not None and cause.errno in errno.errorcode:
        text = os.strerror(cause.errno)  # asyncio's own text names the address again
    else:
        text = str(cause) or type(cause).__name__
    text = text[:1].lower() + text[1:]
    return f"{host}:{port}: {text}" if host and port is not None else text


class LeanTransportError(LeanError):
    """The request was sent, then the connection dropped or the answer timed out."""


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An HTTP answer as bytes, whatever its status; the caller decides what a status means."""

    #: The HTTP status code.
    status: int
    #: Response headers; lookups are case-insensitive (an aiohttp ``CIMultiDictProxy``).
    headers: Mapping[str, str]
    #: The body, decoded from any ``Content-Encoding`` the server applied.
    body: bytes


class LeanPoller:
    """GET requests that mirror an ``AsyncOpenAI``/``AsyncAzureOpenAI`` client: same URL, auth
    headers, default headers, default query (Azure's ``api-version``), timeouts and TLS trust.

    Build it with :meth:`for_client`. The client's configuration is read once, there; a later
    change to the client (a new API key, say) is not seen. The aiohttp session opens on the first
    :meth:`get`, inside the running event loop, and lives until :meth:`aclose`.

    It does not follow redirects (the SDK would): a 3xx comes back as a :class:`RawAnswer`, and
    the caller hands that poll to the SDK.
    """

    __slots__ = (
        "_closed",
        "_connect_errors",
        "_content_type",
        "_default_query",
        "_headers",
        "_keepalive",
        "_limit",
        "_prefix",
        "_qs",
        "_query",
        "_session",
        "_ssl",
        "_timeout",
        "_transport_errors",
        "_wire",
        "_wire_origin",
        "_yarl_url",
    )

    def __init__(
        self,
        *,
        prefix: str,
        query: str,
        headers: dict[str, str],
        timeout: httpx2.Timeout,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        keepalive: float | None,
        qs: Querystring,
        default_query: Mapping[str, object],
        content_type: str | None = None,
        host_header: str | None = None,
    ) -> None:
        import aiohttp
        import yarl

        self._prefix = prefix
        self._query = query
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            # httpx2's pool timeout is the wait for a free connection and its connect timeout the
            # handshake; aiohttp's ``connect`` covers both, ``sock_connect`` the handshake alone.
            connect=None
            if timeout.pool is None or timeout.connect is None
            else timeout.pool + timeout.connect,
            sock_connect=timeout.connect,
            sock_read=timeout.read,
        )
        self._ssl = ssl_context
        self._limit = limit
        self._keepalive = keepalive
        self._qs = qs
        self._default_query = default_query
        self._content_type = content_type
        self._yarl_url = yarl.URL
        self._connect_errors: tuple[type[BaseException], ...] = (
            aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake and certificates, proxy
            aiohttp.InvalidURL,
            # A connect or pool timeout: nothing was written. aiohttp < 3.10 has no class for it
            # and raises ServerTimeoutError, which lands in LeanTransportError.
            *_optional(aiohttp, "ConnectionTimeoutError"),
        )
        self._transport_errors: tuple[type[BaseException], ...] = (
            aiohttp.ClientError,  # disconnected, payload cut, socket read timeout, bad answer
            TimeoutError,
            OSError,
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._wire, self._wire_origin = _wire_for(prefix, host_header, headers, ssl_context,
                                                  self._timeout, keepalive)

    @classmethod
    def for_client(cls, client: openai.AsyncOpenAI) -> LeanPoller | None:
        """A poller that sends what ``client`` sends for a GET, or ``None`` when it cannot.

        ``None`` (with one debug line on the ``asyncbg`` logger saying why) when: not running on
        asyncio, aiohttp is not installed, the client has a custom ``http_client`` (or the SDK's
        default one was given a proxy by the environment), credentials are resolved per request
        (an ``api_key`` callable, an Azure AD token provider, workload identity, a ``provider``,
        ``custom_auth``), a subclass changes how requests are prepared, or the base URL is not
        plain http(s). Call it from inside the event loop that will use the poller.
        """
        reason = _refusal(client)
        if reason is not None:
            _log.debug("asyncbg: lean status checks are off: %s; polling through the SDK", reason)
            return None
        try:
            return cls._mirror(client)
        except _CannotMirror as exc:
            _log.debug("asyncbg: lean status checks are off: %s; polling through the SDK", exc)
            return None

    @classmethod
    def _mirror(cls, client: openai.AsyncOpenAI) -> LeanPoller:
        azure = isinstance(client, openai.AsyncAzureOpenAI)
        http: httpx2.AsyncClient = client._client

        # What BaseClient._build_headers does for a GET with no per-call options: auth, then the
        # client's default headers, later mappings winning case-insensitively, Omit() deleting.
        # Azure's _prepare_options then puts the credential into the per-call headers, where it
        # wins over a default header of the same name.
        auth = client.auth_headers
        merged = _merge_headers(auth, client.default_headers, auth if azure else {})
        content_type = merged.pop("content-type", None)  # the SDK drops it for GET only
        names = set(merged)
        if not ({"authorization", "api-key"} & names if azure else "authorization" in names):
            # The SDK raises TypeError("Could not resolve authentication method") here.
            raise _CannotMirror("the client has no credential for a GET")
        timeout = _as_httpx2_timeout(client.timeout)
        merged["x-stainless-retry-count"] = "0"  # a lean GET is always a first attempt
        read = _read_timeout(client.timeout)
        if read is not None:
            merged["x-stainless-read-timeout"] = str(read)

        # Ask the SDK where a relative path goes (Azure routes non-deployment paths to
        # {endpoint}/openai/), and let the SDK's own httpx2 client merge its headers and encode
        # the default query, exactly as it does for every request.
        probe = client._prepare_url(_PROBE)
        if probe.scheme not in ("http", "https"):
            raise _CannotMirror(f"the base URL {client.base_url} is not http(s)")
        if probe.query or probe.userinfo:
            raise _CannotMirror("the base URL carries a query or user info")
        default_query = {
            k: v for k, v in client.default_query.items() if not isinstance(v, openai.Omit)
        }
        request = http.build_request(
            "GET",
            str(probe),
            headers=list(merged.items()),
            params=client.qs.stringify(cast(Any, default_query)) if default_query else None,
        )
        url = str(request.url)
        prefix, sep, query = url.partition("?")
        if not prefix.endswith(_PROBE):
            raise _CannotMirror(f"unexpected URL layout {url}")
        headers: dict[str, str] = {}
        for name, value in request.headers.multi_items():
            if name in _TRANSPORT_HEADERS:
                continue
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "accept-encoding" in headers:
            headers["accept-encoding"] = _decodable(headers["accept-encoding"])

        pool = getattr(http._transport, "_pool", None)
        ssl_context: ssl.SSLContext | None = None
        if probe.scheme == "https":
            # The very context httpx2 verifies with (certifi or the system store, SSL_CERT_FILE).
            ssl_context = getattr(pool, "_ssl_context", None) or httpx2.create_ssl_context(
                trust_env=http.trust_env
            )
        limits = openai.DEFAULT_CONNECTION_LIMITS
        return cls(
            prefix=prefix[: -len(_PROBE)],
            query=query if sep else "",
            headers=headers,
            timeout=timeout,
            ssl_context=ssl_context,
            limit=limits.max_connections or 0,
            keepalive=limits.keepalive_expiry,
            qs=client.qs,
            default_query=default_query,
            content_type=content_type,
            host_header=request.headers.get("host"),
        )

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (lower-case names), besides Host."""
        return self._headers

    def url(self, path: str, *, params: Mapping[str, str] | None = None) -> str:
        """The absolute URL :meth:`get` requests for ``path`` (relative to the base URL)."""
        url = self._prefix + quote(path.lstrip("/"), safe=_PATH_SAFE)
        if params:
            # Rare: encoded the SDK's way (defaults first, call values winning) on each call.
            merged = {**self._default_query, **params}
            query = httpx2.URL(url, params=self._qs.stringify(cast(Any, merged))).query.decode()
            return f"{url}?{query}"
        return f"{url}?{self._query}" if self._query else url

    async def get(self, path: str, *, params: Mapping[str, str] | None = None) -> RawAnswer:
        """GET ``path`` (relative to the base URL, e.g. ``f"responses/{rid}"``) and read the body.

        A segment is percent-encoded as the SDK's ``path_template`` encodes it, so pass ids as
        they are; ``/`` always separates segments. Any HTTP status comes back as a
        :class:`RawAnswer`. Raises only :class:`LeanConnectError` (nothing was sent, including
        after :meth:`aclose`) and :class:`LeanTransportError` (sent, then the connection failed).
        """
        url = self.url(path, params=params)
        wire = self._wire
        if wire is None:
            return await self._send("GET", url, None, None)
        # The status checks' own transport (asyncbg/_providers/_lean_wire.py).
        from ._lean_wire import WireConnectError, WireError

        try:
            status, headers, body = await wire.get(url[self._wire_origin:])
        except WireConnectError as exc:
            if self._closed:
                raise LeanConnectError(f"GET {url}: the LeanPoller is closed") from exc
            raise LeanConnectError(f"GET {url}: could not connect: {exc.reason}",
                                   reason=exc.reason) from exc
        except WireError as exc:
            raise LeanTransportError(f"GET {url}: the connection failed: {exc}") from exc
        return RawAnswer(status, headers, body)

    async def post(
        self, path: str, body: bytes, *, headers: Mapping[str, str] | None = None
    ) -> RawAnswer:
        """POST ``body`` (JSON, already encoded) to ``path`` with the client's Content-Type and
        ``headers`` beside the client's own; answers and raises as :meth:`get` does.

        A :class:`LeanTransportError` means the request may have reached the server: a create
        that raised it may exist there.
        """
        extra = dict(headers or {})
        if self._content_type is not None:
            extra.setdefault("content-type", self._content_type)
        return await self._send("POST", self.url(path), body, extra)

    async def _send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> RawAnswer:
        session = self._session
        if session is None:
            if self._closed:
                raise LeanConnectError(f"{method} {url}: the LeanPoller is closed")
            session = self._session = self._open()
        try:
            async with session.request(
                method,
                self._yarl_url(url, encoded=True),
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                data = await response.read()
                return RawAnswer(response.status, response.headers, data)
        except self._connect_errors as exc:
            reason = connect_reason(exc)
            raise LeanConnectError(f"{method} {url}: could not connect: {reason}",
                                   reason=reason) from exc
        except self._transport_errors as exc:
            raise LeanTransportError(f"{method} {url}: the connection failed: {exc!r}") from exc
        except RuntimeError as exc:  # "Session is closed": aclose() ran while this one waited
            if self._closed:
                raise LeanConnectError(f"{method} {url}: the LeanPoller is closed") from exc
            raise

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent; later :meth:`get` calls raise LeanConnectError."""
        self._closed = True
        if self._wire is not None:
            self._wire.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=0,
            keepalive_timeout=self._keepalive,
            ssl=self._ssl if self._ssl is not None else True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            # Sent as they are on every request: aiohttp adds only Host, which it computes as
            # httpx2 does.
            headers=self._headers,
            timeout=self._timeout,
            raise_for_status=False,
            # The SDK's httpx2 client never reads proxies or .netrc once we got here.
            trust_env=False,
            # Decompression only engages when the server sets Content-Encoding; we advertise
            # what httpx2 advertises, so we must be able to decode it.
            auto_decompress=True,
        )

    def __repr__(self) -> str:
        opened = self._session is not None or (self._wire is not None and self._wire.opened)
        state = "closed" if self._closed else "open" if opened else "idle"
        return f"<LeanPoller {self._prefix} {state}>"


def _wire_for(
    prefix: str, host_header: str | None, headers: Mapping[str, str],
    ssl_context: ssl.SSLContext | None, timeout: aiohttp.ClientTimeout,
    keepalive: float | None,
) -> tuple[Any, int]:
    """The status checks' own transport for this origin, and the length of the origin in a
    URL; ``(None, 0)`` where it cannot send exactly what aiohttp would (then aiohttp does)."""
    from urllib.parse import urlsplit

    from ._lean_wire import DECODES, Wire

    parts = urlsplit(prefix)
    codings = {c.partition(";")[0].strip().lower()
               for c in headers.get("accept-encoding", "identity").split(",")}
    if (host_header is None or parts.hostname is None or not codings <= DECODES | {"*", ""}
            or parts.scheme not in ("http", "https")
            or (parts.scheme == "https") != (ssl_context is not None)
            or any("\r" in v or "\n" in v for v in headers.values())):
        return None, 0
    port = parts.port or (443 if parts.scheme == "https" else 80)
    wire = Wire(host=parts.hostname, port=port, host_header=host_header, headers=headers,
                ssl_context=ssl_context, connect_timeout=timeout.connect,
                read_timeout=timeout.sock_read, keepalive=keepalive)
    return wire, len(f"{parts.scheme}://{parts.netloc}")


class _CannotMirror(Exception):
    """The client's request cannot be reproduced; the message says why."""


def _refusal(client: openai.AsyncOpenAI) -> str | None:
    """Why the client's GET cannot be mirrored, or ``None`` when it can."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return "not called from inside an event loop"
    if library != "asyncio":
        return f"running on {library}, not asyncio"
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "aiohttp is not installed"
    if not isinstance(client, openai.AsyncOpenAI):
        return f"{type(client).__name__} is not an AsyncOpenAI client"

    azure = isinstance(client, openai.AsyncAzureOpenAI)
    base = openai.AsyncAzureOpenAI if azure else openai.AsyncOpenAI
    for name in _PREPARATION:
        if getattr(type(client), name, None) is not getattr(base, name, None):
            return f"{type(client).__name__} overrides {name}"
    if client.custom_auth is not None:
        return "the client uses custom_auth"
    if getattr(client, "_provider_runtime", None) is not None:
        return "the client authenticates through a provider"
    if getattr(client, "workload_identity", None) is not None:
        return "the client uses workload identity"
    if getattr(client, "_api_key_provider", None) is not None:
        return "the API key is a callable, resolved per request"
    if getattr(client, "_azure_ad_token_provider", None) is not None:
        return "an Azure AD token provider is called per request"

    from openai._base_client import AsyncHttpxClientWrapper

    http = client._client
    if type(http) is not AsyncHttpxClientWrapper:
        return f"the client was given a custom http_client ({type(http).__name__})"
    if type(http._transport) is not httpx2.AsyncHTTPTransport:
        return "the SDK's http client has a custom transport"
    if any(transport is not None for transport in http._mounts.values()):
        return "the SDK's http client routes through a proxy (from the environment)"
    if http.auth is not None or http.params:
        return "the SDK's http client has its own auth or params"
    hooks = [
        hook
        for hook in (*http.event_hooks["request"], *http.event_hooks["response"])
        if getattr(hook, "__module__", "") != "openai.lib.azure"  # strips api-key on redirect
    ]
    if hooks:
        return "the SDK's http client has event hooks"
    return None


#: The SDK methods that shape a request; a subclass that replaces one may send something else.
_PREPARATION: Final = (
    "_prepare_options",
    "_prepare_request",
    "_send_request",
    "_build_request",
    "_build_headers",
    "_prepare_url",
    "_auth_headers",
    "auth_headers",
    "default_headers",
    "default_query",
    "custom_auth",
)


def _decodable(accept_encoding: str) -> str:
    """``accept_encoding`` less any coding aiohttp could not decode (httpx2 and aiohttp find
    brotli and zstd libraries separately; both decode gzip and deflate)."""
    from aiohttp import compression_utils

    can = {"gzip", "deflate", "identity", "*"}
    if getattr(compression_utils, "HAS_BROTLI", False):
        can.add("br")
    if getattr(compression_utils, "HAS_ZSTD", False):
        can.add("zstd")
    codings = [c.strip() for c in accept_encoding.split(",")]
    return ", ".join(c for c in codings if c.partition(";")[0].strip().lower() in can)


def _optional(module: object, name: str) -> tuple[type[BaseException], ...]:
    cls = getattr(module, name, None)
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


def _merge_headers(*mappings: Mapping[str, object]) -> dict[str, str]:
    """Merge case-insensitively into lower-case names; later wins, ``Omit()`` deletes."""
    merged: dict[str, str] = {}
    for mapping in mappings:
        for name, value in mapping.items():
            key = name.lower()
            if isinstance(value, openai.Omit):
                merged.pop(key, None)
            else:
                merged[key] = str(value)
    return merged


def _as_httpx2_timeout(value: object) -> httpx2.Timeout:
    if value is None or isinstance(value, int | float):
        return httpx2.Timeout(value)
    if isinstance(value, httpx2.Timeout):
        return value
    parts = {k: getattr(value, k, None) for k in ("connect", "read", "write", "pool")}
    if all(v is None or isinstance(v, int | float) for v in parts.values()):
        return httpx2.Timeout(**parts)  # a legacy httpx.Timeout, as the SDK normalizes it
    raise _CannotMirror(f"unrecognised timeout {value!r}")


def _read_timeout(value: object) -> object:
    """The value the SDK writes into ``x-stainless-read-timeout`` (its own ``str()`` of it)."""
    if value is None or isinstance(value, int | float):
        return value
    return getattr(value, "read", None)


# -- reading the status ------------------------------------------------------------------------

#: A JSON string token or a bracket, outside strings: enough to know an object's nesting depth.
_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]')
_STATUS_VALUE: Final = re.compile(rb'\s*:\s*"([^"\\]*)"')
#: Tokens to walk before giving up on a quick read; a Responses object puts ``status`` fourth.
_MAX_TOKENS: Final = 48


def read_status(body: bytes) -> str | None:
    """The top-level ``"status"`` of a JSON object body, or ``None`` if it has none.

    Walks string and bracket tokens from the start, tracking depth, so a nested ``"status"``
    (an output item's) or one inside a string never matches; the Responses API writes the
    top-level status early, so this usually reads a few dozen bytes, and does not validate the
    rest of the body. Falls back to ``json.loads`` when the status is far in or escaped, which
    raises ``ValueError`` for a body that is not JSON.
    """
    depth = 0
    for count, match in enumerate(_TOKEN.finditer(body)):
        if count >= _MAX_TOKENS:
            break
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string: at depth 1 it may be the key we want
            if depth == 1 and token == b'"status"':
                value = _STATUS_VALUE.match(body, match.end())
                if value is not None:
                    return value.group(1).decode("utf-8")
                break  # not a plain string value: let json decide
        elif first in (0x7B, 0x5B):  # { [
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return None  # the top-level object closed without a status
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    status = data.get("status")
    return status if isinstance(status, str) else None
