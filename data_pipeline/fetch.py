"""Download one image URL under the ingestion rules: schemes, policy, redirects, byte cap, deadline, retries.

http(s) is fetched with `http.client` rather than requests/urllib3 because we must connect to
an address we checked ourselves (see `netpolicy`) while keeping the Host header and TLS server
name of the URL; pooling libraries resolve names on their own. Other schemes (file, s3, memory,
...) are refused unless opened explicitly (`allow_schemes`); an opened one is read through fsspec
under the same byte cap. fsspec chains (`simplecache::http://...`) are always refused.

Within a shard task, connections are kept alive and reused per host through a `ConnectionPool`
(the real web answers HTTP/1.1 keep-alive; a reused TLS connection skips its handshake): only to an
address the policy has just passed for this URL, with the same TLS trust, and only after a 200
read to its end. A reused connection the server has meanwhile closed is retried once on a fresh
one, without counting as an attempt.

Every attempt has one wall-clock deadline covering DNS, connect, TLS, headers and body of all
redirect hops: a watchdog shuts the socket down when it passes, so a server dripping one header
byte at a time cannot hold a fetch longer. Transient failures (timeouts, connection errors,
temporary DNS failures, HTTP 408/429/5xx, truncated bodies) are retried with exponential backoff
and full jitter, honouring `Retry-After` up to a cap, until the URL's own deadline.

A failure is never raised: `fetch()` returns a `Fetched` with a short, stable `reason`
(`http_404`, `timeout`, `connection_error`, `dns_error`, `dns_temporary`, `blocked_address`,
`refused_scheme`, `too_large`, `redirect_loop`, `too_many_redirects`, `opt_out`, `bad_url`,
`bad_response`, `tls_error`, `truncated`, `not_found`, `read_error`) and the attempts made.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import fsspec

from data_pipeline.connections import ConnectionPool, Watchdog
from data_pipeline.netpolicy import BlockedAddress, NetworkPolicy, ResolveError, TemporaryResolveError

log = logging.getLogger(__name__)

HTTP_SCHEMES = ("http", "https")
MAX_URL_CHARS = 4096
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "dns_temporary", "truncated", "http_408",
                               "http_429"})
PATH_SAFE = "/%:@!$&'()*+,;=~-._"


def is_transient(reason: str) -> bool:
    """Reasons worth another attempt (now with backoff, or later with `--retry-failed`)."""
    return reason in TRANSIENT_REASONS or (reason.startswith("http_5") and len(reason) == 8)


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = 10.0           # one attempt: DNS + connect + headers + body, all hops
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    honour_optout: bool = True
    optout_directives: tuple = DEFAULT_OPTOUT
    user_agent: str = "megaclass/0.1 (+dataset ingestion; honours X-Robots-Tag noai)"
    policy: NetworkPolicy = NetworkPolicy()
    allow_schemes: tuple = HTTP_SCHEMES
    ca_file: str | None = None        # PEM bundle trusted in addition to the system CAs
    retries: int = 2                  # further attempts after a transient failure
    retry_backoff_s: float = 0.5      # first backoff ceiling; doubles per attempt, full jitter
    max_retry_after_s: float = 10.0   # Retry-After is honoured up to this
    deadline_s: float = 30.0          # all attempts and waits of one URL


@dataclass(frozen=True)
class Fetched:
    data: bytes | None
    reason: str = ""          # empty when data is set
    final_url: str = ""
    attempts: int = 1


class _Failure(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def fetch(url: str, opts: FetchOptions, pool: ConnectionPool | None = None) -> Fetched:
    """Bytes of `url` or the reason why not; never raises for bad data or bad hosts.

    pool: keep-alive connections shared by the fetches of one shard task (None: one per request).
    """
    url_deadline = time.monotonic() + opts.deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            data, final_url = _fetch_once(url, opts, min(url_deadline, time.monotonic() + opts.timeout_s), pool)
            return Fetched(data, "", final_url, attempts)
        except _Failure as failure:
            if not is_transient(failure.reason) or attempts > opts.retries:
                return Fetched(None, failure.reason, "", attempts)
            if failure.retry_after_s is not None:
                wait = min(failure.retry_after_s, opts.max_retry_after_s)
            else:
                wait = random.uniform(0, opts.retry_backoff_s * 2 ** (attempts - 1))
            if time.monotonic() + wait >= url_deadline:
                return Fetched(None, failure.reason, "", attempts)
            time.sleep(wait)


def clean_url(url: str) -> str:
    """A URL safe to put on the wire: length and control characters checked, non-ASCII encoded.

    Non-ASCII paths and queries are percent-encoded as browsers do, IDN hosts IDNA-encoded,
    user info dropped; anything urlsplit cannot parse (`http://[::1/x`) is `bad_url`.
    """
    if not url or len(url) > MAX_URL_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _Failure("bad_url")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise _Failure("bad_url") from None
    if parts.scheme.lower() not in HTTP_SCHEMES:
        return url
    if not host:
        raise _Failure("bad_url")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Failure("bad_url") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme.lower(), netloc, quote(parts.path, safe=PATH_SAFE),
                       quote(parts.query, safe=PATH_SAFE + "?"), ""))


def _fetch_once(url: str, opts: FetchOptions, deadline: float, pool: ConnectionPool | None) -> tuple[bytes, str]:
    # the whole prefix: an fsspec chain (`simplecache::http`) is no scheme anyone can open
    scheme = url.split("://", 1)[0].strip().lower() if "://" in url else ""
    if not scheme:
        raise _Failure("bad_url")
    if scheme not in opts.allow_schemes:
        raise _Failure("refused_scheme")
    url = clean_url(url)
    if scheme in HTTP_SCHEMES:
        return _fetch_http(url, opts, deadline, pool)
    return _fetch_fsspec(url, opts.max_bytes), url


def _fetch_fsspec(url: str, max_bytes: int) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError):
        raise _Failure("not_found") from None
    except (ValueError, ImportError):
        raise _Failure("bad_url") from None
    except Exception as exc:  # fsspec backends raise their own types (ftplib.error_perm, botocore, ...)
        log.info("read_error %s: %s: %s", url, type(exc).__name__, exc)
        raise _Failure("read_error") from None
    if len(data) > max_bytes:
        raise _Failure("too_large")
    return data


@functools.lru_cache(maxsize=8)
def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """System CAs plus `ca_file`; built once per process (loading the store costs milliseconds)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def opted_out(header_values: Sequence[str], directives: Sequence[str], agent: str = "megaclass") -> bool:
    """True if any X-Robots-Tag value carries an opt-out directive that applies to us.

    `X-Robots-Tag: noai`, `noimageai, nofollow`, `megaclass: noai` and `otherbot: noai` (the
    last applies to another crawler only) are all handled as the header's grammar defines.
    """
    wanted = {d.lower() for d in directives}
    for value in header_values:
        scope = None
        for token in value.split(","):
            token = token.strip().lower()
            if ":" in token:
                prefix, _, rest = token.partition(":")
                if prefix.strip() not in wanted | {"unavailable_after", "max-snippet", "max-image-preview",
                                                   "max-video-preview"}:
                    scope, token = prefix.strip(), rest.strip()
            if scope not in (None, "*", agent.lower()):
                continue
            if token in wanted:
                return True
    return False


_WATCHDOG = Watchdog()
_RESOLVER = ThreadPoolExecutor(max_workers=32, thread_name_prefix="resolve")  # getaddrinfo has no timeout


def _after_fork_in_child() -> None:
    """A forked worker (the local ingest executor) has none of its parent's threads: fresh ones."""
    global _WATCHDOG, _RESOLVER
    _WATCHDOG = Watchdog()
    _RESOLVER = ThreadPoolExecutor(max_workers=32, thread_name_prefix="resolve")


os.register_at_fork(after_in_child=_after_fork_in_child)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Failure("timeout")
    return left


def _resolve(policy: NetworkPolicy, host: str, port: int, deadline: float) -> list:
    try:
        try:
            ipaddress.ip_address(host)
            return policy.resolve(host, port)  # a literal: no lookup to wait for
        except ValueError:
            pass
        return _RESOLVER.submit(policy.resolve, host, port).result(timeout=_remaining(deadline))
    except FutureTimeout:
        raise _Failure("timeout") from None
    except BlockedAddress:
        raise _Failure("blocked_address") from None
    except TemporaryResolveError:
        raise _Failure("dns_temporary") from None
    except ResolveError:
        raise _Failure("dns_error") from None


def _fetch_http(url: str, opts: FetchOptions, deadline: float, pool: ConnectionPool | None) -> tuple[bytes, str]:
    seen = {url}
    for _hop in range(opts.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        addresses = _resolve(opts.policy, parts.hostname, port, deadline)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        status, location, body = _request(scheme, addresses, parts.hostname, port, parts.netloc, target,
                                          deadline, opts, pool)
        if status in REDIRECT_STATUSES:
            if not location:
                raise _Failure(f"http_{status}")
            try:
                url = urljoin(url, location.strip())
            except ValueError:
                raise _Failure("bad_url") from None
            if urlsplit(url).scheme.lower() not in HTTP_SCHEMES:
                raise _Failure("refused_scheme")  # a redirect never leaves http(s)
            url = clean_url(url)
            if url in seen:
                raise _Failure("redirect_loop")
            seen.add(url)
            continue
        return body, url
    raise _Failure("too_many_redirects")


def _connect(addresses: list, port: int, deadline: float) -> tuple[object, socket.socket]:
    """(address, TCP connection) to the first checked address that answers (never a re-resolved one)."""
    last: OSError | None = None
    for ip in addresses:
        try:
            return ip, socket.create_connection((str(ip), port), timeout=_remaining(deadline))
        except OSError as exc:
            last = exc
    _remaining(deadline)
    raise _Failure("connection_error") from last


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Stale(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""


def _request(scheme: str, addresses: list, host: str, port: int, netloc: str, target: str, deadline: float,
             opts: FetchOptions, pool: ConnectionPool | None) -> tuple[int, str | None, bytes]:
    """One GET to a checked address; returns (status, Location, body). Body is read only for a 200."""
    key = (scheme, host.lower(), port, opts.ca_file)
    reused = pool.take(key, addresses) if pool is not None else None
    if reused is not None:
        try:
            return _exchange(scheme, *reused, host, port, netloc, target, deadline, opts, pool, key, reused=True)
        except _Stale:
            pass  # closed while idle (servers time idle connections out): once more on a fresh one
    ip, sock = _connect(addresses, port, deadline)
    return _exchange(scheme, ip, sock, host, port, netloc, target, deadline, opts, pool, key, reused=False)


def _exchange(scheme: str, ip: object, sock: socket.socket, host: str, port: int, netloc: str, target: str,
              deadline: float, opts: FetchOptions, pool: ConnectionPool | None, key: tuple,
              reused: bool) -> tuple[int, str | None, bytes]:
    """Request and response on `sock`; gives the connection back to `pool` only in a clean state."""
    token = _WATCHDOG.watch(sock.fileno(), deadline)
    conn = http.client.HTTPConnection(host, port)
    keep = answered = False
    try:
        if scheme == "https" and not reused:
            sock = tls_context(opts.ca_file).wrap_socket(sock, server_hostname=host)
        conn.sock = sock
        sock.settimeout(_remaining(deadline))
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", netloc.rpartition("@")[2])
        conn.putheader("User-Agent", opts.user_agent)
        conn.putheader("Accept", "image/*,*/*;q=0.5")
        conn.putheader("Accept-Encoding", "identity")
        if pool is None:
            conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        answered = True
        status = response.status
        if status in REDIRECT_STATUSES:
            return status, response.getheader("Location"), b""
        if status != 200:
            retry_after = _retry_after(response.getheader("Retry-After")) if status in (429, 503) else None
            raise _Failure(f"http_{status}", retry_after)
        if opts.honour_optout and opted_out(response.headers.get_all("X-Robots-Tag") or [],
                                            opts.optout_directives):
            raise _Failure("opt_out")
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > opts.max_bytes:
            raise _Failure("too_large")
        body = _read_capped(sock, response, deadline, opts.max_bytes)
        # reusable only at the declared end of the body (a counted-down length or the last chunk)
        keep = pool is not None and not response.will_close and (response.length == 0 or response.isclosed())
        response.close()  # the reader over the socket, not the socket
        return status, None, body
    except _Failure:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if reused and not answered and isinstance(exc, (ConnectionError, ssl.SSLError)):
            raise _Stale() from None
        raise _failure_of(exc, deadline) from None
    finally:
        _WATCHDOG.cancel(token)
        conn.sock = None  # the socket's fate is decided here, not by the HTTPConnection
        if keep and time.monotonic() < deadline:  # past the deadline the watchdog may have shut it down
            pool.give(key, ip, sock)
        else:
            sock.close()


def _failure_of(exc: Exception, deadline: float) -> _Failure:
    """The recorded reason of a socket, TLS or HTTP error during one exchange."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return _Failure("timeout")
    if isinstance(exc, ssl.SSLError):
        return _Failure(_late(deadline) or "tls_error")
    if isinstance(exc, http.client.IncompleteRead):
        return _Failure(_late(deadline) or "truncated")
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionError)):
        return _Failure(_late(deadline) or "connection_error")
    if isinstance(exc, (http.client.HTTPException, ValueError)):
        return _Failure(_late(deadline) or "bad_response")  # malformed status line/headers/chunks
    return _Failure(_late(deadline) or "connection_error")


def _late(deadline: float) -> str:
    """'timeout' when the watchdog is what broke the connection, else ''."""
    return "timeout" if time.monotonic() >= deadline else ""


def _read_capped(sock: socket.socket, response: http.client.HTTPResponse, deadline: float,
                 max_bytes: int) -> bytes:
    """Stream the body in chunks, stopping past `max_bytes` or the deadline (endless bodies end here)."""
    chunks = []
    size = 0
    while True:
        sock.settimeout(_remaining(deadline))
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise _Failure("too_large")
        chunks.append(chunk)
    _remaining(deadline)  # an end of stream after the deadline is the watchdog's, not the server's
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and size < int(length):
        raise _Failure("truncated")
    return b"".join(chunks)
