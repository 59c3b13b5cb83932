"""Fetching under the ingestion rules, against a real loopback HTTP server (no Ray)."""

import ipaddress
import threading
import time

import pytest

from data_pipeline.config import ConfigError
from data_pipeline.fetch import ConnectionPool, FetchOptions, fetch, opted_out
from data_pipeline.netpolicy import NetworkPolicy
from tests.conftest import free_port

LOOPBACK = NetworkPolicy.from_cidrs(["127.0.0.0/8"])


@pytest.fixture(scope="module")
def server(http_server):
    s = http_server
    s.add("/ok.jpg", b"IMAGE")
    s.add("/err", status=500)
    s.add("/slow", b"late", delay_s=3.0)
    s.add("/r1", status=302, location="/r2")
    s.add("/r2", status=301, location="/ok.jpg")
    s.add("/loop-a", status=302, location="/loop-b")
    s.add("/loop-b", status=302, location="/loop-a")
    for i in range(8):
        s.add(f"/chain{i}", status=302, location=f"/chain{i + 1}")
    s.add("/endless", endless=True)
    s.add("/big", b"x" * 5000)
    s.add("/noai", b"IMAGE", headers={"X-Robots-Tag": "noindex"})
    s.add("/noimageai", b"IMAGE", headers={"X-Robots-Tag": ["nofollow", "noimageai"]})
    s.add("/otherbot", b"IMAGE", headers={"X-Robots-Tag": "otherbot: noai"})
    s.add("/to-metadata", status=302, location="http://169.254.169.254/latest/meta-data/")
    yield s


def opts(**kw):
    kw.setdefault("policy", LOOPBACK)
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("retries", 0)
    return FetchOptions(**kw)


def test_ok_and_http_errors(server):
    assert fetch(server.url("/ok.jpg"), opts()).data == b"IMAGE"
    assert fetch(server.url("/nothing"), opts()).reason == "http_404"
    assert fetch(server.url("/err"), opts()).reason == "http_500"


def test_loopback_refused_by_default(server):
    result = fetch(server.url("/ok.jpg"), FetchOptions())
    assert result.data is None and result.reason == "blocked_address"
    assert server.hits["/ok.jpg"] >= 1  # from the other tests only; the check happens before connecting


def test_redirects(server):
    result = fetch(server.url("/r1"), opts())
    assert result.data == b"IMAGE" and result.final_url == server.url("/ok.jpg")
    assert fetch(server.url("/loop-a"), opts()).reason == "redirect_loop"
    assert fetch(server.url("/chain0"), opts(max_redirects=3)).reason == "too_many_redirects"
    assert fetch(server.url("/r1"), opts(max_redirects=1)).reason == "too_many_redirects"


def test_redirect_to_refused_address_is_blocked_per_hop(server):
    assert fetch(server.url("/to-metadata"), opts()).reason == "blocked_address"


def test_timeout(server):
    start = time.monotonic()
    assert fetch(server.url("/slow"), opts(timeout_s=0.5)).reason == "timeout"
    assert time.monotonic() - start < 2.5


def test_endless_body_is_capped_not_read(server):
    start = time.monotonic()
    assert fetch(server.url("/endless"), opts(max_bytes=1 << 20)).reason == "too_large"
    assert time.monotonic() - start < 2.0
    assert fetch(server.url("/big"), opts(max_bytes=4000)).reason == "too_large"  # by Content-Length


def test_optout_headers(server):
    assert fetch(server.url("/noai"), opts()).reason == "opt_out"
    assert fetch(server.url("/noimageai"), opts()).reason == "opt_out"
    assert fetch(server.url("/otherbot"), opts()).data == b"IMAGE"
    assert fetch(server.url("/noai"), opts(honour_optout=False)).data == b"IMAGE"
    assert opted_out(["megaclass: noai"], ["noai"]) and opted_out(["*: noimageai"], ["noimageai"])
    assert not opted_out(["nofollow, noarchive"], ["noai"])


def test_connection_errors_and_bad_urls(server, tmp_path):
    port = free_port()  # nothing listens on it
    assert fetch(f"http://127.0.0.1:{port}/x.jpg", opts()).reason == "connection_error"
    assert fetch("http:///nohost.jpg", opts()).reason == "bad_url"
    assert fetch("http://no-such-host.invalid/x.jpg", opts()).reason == "dns_error"
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert fetch(f"file://{tmp_path}/a.bin", opts()).reason == "refused_scheme"  # unless opened
    files = ("http", "https", "file")
    assert fetch(f"file://{tmp_path}/a.bin", opts(allow_schemes=files)).data == b"1234"
    assert fetch(f"file://{tmp_path}/a.bin", opts(allow_schemes=files, max_bytes=3)).reason == "too_large"
    assert fetch(f"file://{tmp_path}/none.bin", opts(allow_schemes=files)).reason == "not_found"


def test_policy_ranges():
    default = NetworkPolicy()
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "224.0.0.1", "0.0.0.0",
                    "240.0.0.1", "::1", "fe80::1", "::ffff:10.0.0.1", "fc00::1"):
        assert not default.permits(ipaddress.ip_address(address)), address
    assert default.permits(ipaddress.ip_address("8.8.8.8"))
    opened = NetworkPolicy.from_cidrs(["10.0.0.0/8"])
    assert opened.permits(ipaddress.ip_address("10.1.2.3"))
    assert not opened.permits(ipaddress.ip_address("192.168.0.1"))
    with pytest.raises(ConfigError, match="not-a-cidr"):
        NetworkPolicy.from_cidrs(["not-a-cidr"])


def test_concurrent_fetches_share_nothing(server):
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(server.url("/r1"), opts()).data))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"IMAGE"] * 16


# ---- keep-alive connections ---------------------------------------------------------------------

@pytest.fixture()
def keep_alive_server():
    from tests.http_server import LoopbackServer

    with LoopbackServer(keep_alive=True) as s:
        for i in range(6):
            s.add(f"/k{i}.jpg", f"IMAGE{i}".encode())
        s.add("/bye.jpg", b"LAST", hang_up=True)
        s.add("/gone", status=404)
        yield s


def test_a_pool_reuses_one_connection_per_host(keep_alive_server):
    s = keep_alive_server
    with ConnectionPool() as pool:
        bodies = [fetch(s.url(f"/k{i}.jpg"), opts(), pool).data for i in range(6)]
        assert bodies == [f"IMAGE{i}".encode() for i in range(6)]
        assert s.connections == 1 and pool.reused == 5
    for i in range(3):  # without a pool every request has its own connection
        assert fetch(s.url(f"/k{i}.jpg"), opts()).data == f"IMAGE{i}".encode()
    assert s.connections == 4


def test_a_connection_closed_by_the_server_is_not_an_error(keep_alive_server):
    s = keep_alive_server
    with ConnectionPool() as pool:
        assert fetch(s.url("/bye.jpg"), opts(), pool).data == b"LAST"  # the server hangs up silently after it
        time.sleep(0.05)
        result = fetch(s.url("/k0.jpg"), opts(retries=0), pool)
        assert result.data == b"IMAGE0" and result.attempts == 1
        assert s.connections == 2


def test_only_a_clean_200_gives_its_connection_back(keep_alive_server, http_server):
    s = keep_alive_server
    with ConnectionPool() as pool:
        assert fetch(s.url("/gone"), opts(), pool).reason == "http_404"  # body unread: closed, not reused
        assert fetch(s.url("/k0.jpg"), opts(), pool).data == b"IMAGE0"
        assert s.connections == 2 and pool.reused == 0
        http_server.add("/closing.jpg", b"CLOSE")  # answers with Connection: close
        before = http_server.connections
        for _ in range(3):
            assert fetch(http_server.url("/closing.jpg"), opts(), pool).data == b"CLOSE"
        assert http_server.connections == before + 3 and pool.reused == 0


def test_a_connection_serves_only_its_host_and_a_checked_address(keep_alive_server):
    s = keep_alive_server
    both = NetworkPolicy.from_cidrs(["127.0.0.0/8", "::1/128"])
    with ConnectionPool() as pool:
        assert fetch(s.url("/k0.jpg"), opts(policy=both), pool).data == b"IMAGE0"
        # same address, another name: a TLS connection is bound to its name, so no host borrows one
        assert fetch(f"http://localhost:{s.port}/k1.jpg", opts(policy=both), pool).data == b"IMAGE1"
        assert s.connections == 2 and pool.reused == 0
        # an idle connection is handed out only to an address the caller has just checked
        key = ("http", "127.0.0.1", s.port, None)
        assert pool.take(key, [ipaddress.ip_address("127.0.0.2")]) is None
        assert pool.take(key, [ipaddress.ip_address("127.0.0.1")]) is None  # the stale one was closed, not kept
