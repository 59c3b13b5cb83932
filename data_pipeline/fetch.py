"""Download one image URL under the ingestion rules: policy, redirects, byte cap, deadline, opt-out.

http(s) is fetched with `http.client` rather than requests/urllib3 because we must connect to
an address we checked ourselves (see `netpolicy`) while keeping the Host header and TLS server
name of the URL; pooling libraries resolve names on their own. Any other scheme (file, s3, gs,
memory, ...) is read through fsspec under the same byte cap.

A failure is never raised: `fetch()` returns a `Fetched` with a short, stable `reason`
(`http_404`, `timeout`, `connection_error`, `dns_error`, `blocked_address`, `too_large`,
`redirect_loop`, `too_many_redirects`, `opt_out`, `bad_url`, `not_found`, `read_error`).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urljoin, urlsplit

import fsspec

from data_pipeline.netpolicy import BlockedAddress, NetworkPolicy, ResolveError

HTTP_SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = 10.0           # whole download (connect + headers + body), all hops
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    honour_optout: bool = True
    optout_directives: tuple = DEFAULT_OPTOUT
    user_agent: str = "megaclass/0.1 (+dataset ingestion; honours X-Robots-Tag noai)"
    policy: NetworkPolicy = NetworkPolicy()


@dataclass(frozen=True)
class Fetched:
    data: bytes | None
    reason: str = ""          # empty when data is set
    final_url: str = ""


class _Failure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def fetch(url: str, opts: FetchOptions) -> Fetched:
    """Bytes of `url` or the reason why not; never raises for bad data or bad hosts."""
    scheme = urlsplit(url).scheme.lower()
    try:
        if scheme in HTTP_SCHEMES:
            data, final_url = _fetch_http(url, opts)
            return Fetched(data, "", final_url)
        return Fetched(_fetch_fsspec(url, opts.max_bytes), "", url)
    except _Failure as failure:
        return Fetched(None, failure.reason)


def _fetch_fsspec(url: str, max_bytes: int) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise _Failure("not_found") from None
    except IsADirectoryError:
        raise _Failure("not_found") from None
    except (ValueError, ImportError):
        raise _Failure("bad_url") from None
    except OSError:
        raise _Failure("read_error") from None
    if len(data) > max_bytes:
        raise _Failure("too_large")
    return data


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed, already-checked IP, verifying the certificate for the URL's host."""

    def __init__(self, ip: str, host: str, port: int, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _open_connection(scheme: str, ip: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return _PinnedHTTPSConnection(ip, host, port, timeout, ssl.create_default_context())
    return http.client.HTTPConnection(ip, port, timeout=timeout)


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


def _fetch_http(url: str, opts: FetchOptions) -> tuple[bytes, str]:
    deadline = time.monotonic() + opts.timeout_s
    seen = {url}
    for _hop in range(opts.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in HTTP_SCHEMES or not parts.hostname:
            raise _Failure("bad_url")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise _Failure("bad_url") from None
        try:
            addresses = opts.policy.resolve(parts.hostname, port)
        except BlockedAddress:
            raise _Failure("blocked_address") from None
        except ResolveError:
            raise _Failure("dns_error") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        status, location, body = _request(scheme, str(addresses[0]), parts.hostname, port, parts.netloc,
                                          target, deadline, opts)
        if status in REDIRECT_STATUSES:
            if not location:
                raise _Failure(f"http_{status}")
            url = urljoin(url, location)
            if url in seen:
                raise _Failure("redirect_loop")
            seen.add(url)
            continue
        return body, url
    raise _Failure("too_many_redirects")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Failure("timeout")
    return left


def _request(scheme: str, ip: str, host: str, port: int, netloc: str, target: str, deadline: float,
             opts: FetchOptions) -> tuple[int, str | None, bytes]:
    """One GET; returns (status, Location, body). Body is read only for a 200."""
    conn = _open_connection(scheme, ip, host, port, _remaining(deadline))
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", netloc.rpartition("@")[2])
        conn.putheader("User-Agent", opts.user_agent)
        conn.putheader("Accept", "image/*,*/*;q=0.5")
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        conn.endheaders()
        sock = conn.sock  # getresponse() may hand the socket to the response and drop conn.sock
        response = conn.getresponse()
        status = response.status
        if status in REDIRECT_STATUSES:
            return status, response.getheader("Location"), b""
        if status != 200:
            raise _Failure(f"http_{status}")
        if opts.honour_optout and opted_out(response.headers.get_all("X-Robots-Tag") or [],
                                            opts.optout_directives):
            raise _Failure("opt_out")
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > opts.max_bytes:
            raise _Failure("too_large")
        return status, None, _read_capped(sock, response, deadline, opts.max_bytes)
    except (socket.timeout, TimeoutError):
        raise _Failure("timeout") from None
    except http.client.IncompleteRead:
        raise _Failure("truncated") from None
    except ssl.SSLError:
        raise _Failure("tls_error") from None
    except (http.client.HTTPException, OSError):
        raise _Failure("connection_error") from None
    finally:
        conn.close()


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
        _remaining(deadline)
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and size < int(length):
        raise _Failure("truncated")
    return b"".join(chunks)
