"""Rows a stranger controls, tried as an attacker would: schemes, addresses, slow servers, broken HTTP,
TLS, payloads hidden in JPEGs, formats we do not decode, and rows that make our own code raise.

Each case must end as that row's recorded reason, never as a crashed fetch or shard.
"""

import datetime
import io
import ipaddress
import socket
import threading
import time

import pyarrow as pa
import pytest
from PIL import Image

from cluster.cli import main
from data_pipeline import ingest as ingest_module
from data_pipeline.config import ConfigError, replace
from data_pipeline.fetch import ConnectionPool, FetchOptions, clean_url, fetch
from data_pipeline.image import ImageOptions, plain_jpeg, process_image
from data_pipeline.ingest import IngestConfig
from data_pipeline.shard_plan import url_skips
from data_pipeline.netpolicy import NetworkPolicy
from tests.conftest import solid_jpeg as jpeg
from tests.http_server import LoopbackServer
from tests.test_ingest import CFG, ingest, read_index, write_table

LOOPBACK = NetworkPolicy.from_cidrs(["127.0.0.0/8", "::1/128"])


def opts(**kw):
    kw.setdefault("policy", LOOPBACK)
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("retries", 0)
    return FetchOptions(**kw)


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as s:
        s.add("/ok.jpg", b"IMAGE")
        s.add("/caf%C3%A9%20au%20lait.jpg", b"CAFE")
        s.add("/to-file", status=302, location="file:///etc/passwd")
        yield s


class ScriptedServer:
    """Raw TCP on 127.0.0.1: each connection gets `script(conn)` after the request is read."""

    def __init__(self, script):
        self.script = script
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            try:
                conn.recv(65536)
                self.script(conn)
            except OSError:
                return

    def url(self, path="/x.jpg"):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"

    def close(self):
        self.sock.close()


def scripted(payload: bytes):
    server = ScriptedServer(lambda conn: conn.sendall(payload))
    return server


# ---- schemes and addresses --------------------------------------------------------------------

def test_other_schemes_and_fsspec_chains_are_refused(server, tmp_path):
    (tmp_path / "secret").write_bytes(b"SECRET")
    hostile = [f"simplecache::{server.url('/ok.jpg')}", f"blockcache::{server.url('/ok.jpg')}",
               "ftp://127.0.0.1/x.jpg", "file:///etc/passwd", f"file://{tmp_path}/secret", "s3://bucket/key.jpg",
               "memory://x.jpg"]
    for url in hostile:
        assert fetch(url, opts()).reason == "refused_scheme", url
    # opening file:// does not open chains through it
    assert fetch(f"simplecache::file://{tmp_path}/secret", opts(allow_schemes=("file",))).reason == "refused_scheme"
    assert fetch(server.url("/to-file"), opts(allow_schemes=("http", "https", "file"))).reason == "refused_scheme"
    skips = url_skips(pa.array(hostile + [server.url("/ok.jpg"), "no-scheme", "http:///nohost"]), ("http", "https"))
    assert skips.to_pylist() == ["refused_scheme"] * len(hostile) + [None, "bad_url", "bad_url"]


def test_every_non_global_address_is_refused():
    policy = NetworkPolicy()
    for address in ("100.100.100.200", "100.64.0.1", "198.18.0.1", "0.0.0.0", "240.0.0.1", "255.255.255.255",
                    "64:ff9b::7f00:1", "2002:7f00:1::1", "::ffff:169.254.169.254", "2001:db8::1", "ff02::1"):
        assert not policy.permits(ipaddress.ip_address(address)), address
    for address in ("8.8.8.8", "2606:4700::1", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert policy.permits(ipaddress.ip_address(address)), address
    start = time.monotonic()
    assert fetch("http://100.100.100.200/latest/meta-data/", FetchOptions(retries=0)).reason == "blocked_address"
    assert time.monotonic() - start < 0.5  # refused before any connection attempt


# ---- one deadline per attempt -----------------------------------------------------------------

def test_header_drip_is_bounded_by_the_deadline():
    def drip(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(60):
            conn.sendall(b"a")
            time.sleep(0.05)
    server = ScriptedServer(drip)
    start = time.monotonic()
    result = fetch(server.url(), opts(timeout_s=0.6))
    elapsed = time.monotonic() - start
    server.close()
    assert result.reason == "timeout" and elapsed < 1.2, (result, elapsed)


def test_slow_dns_is_bounded_by_the_deadline():
    class SlowResolver(NetworkPolicy):
        def resolve(self, host, port):
            time.sleep(2.0)
            return super().resolve("127.0.0.1", port)
    start = time.monotonic()
    result = fetch("http://slow.example/x.jpg", opts(policy=SlowResolver(LOOPBACK.allowed), timeout_s=0.4))
    assert result.reason == "timeout" and time.monotonic() - start < 1.0


def test_infinite_timeout_is_one_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="^fetch.timeout_s"):
        replace(IngestConfig(), ["fetch.timeout_s=inf"])
    with pytest.raises(SystemExit) as exited:  # argparse refuses it: exit 2, one line
        main(["ingest", str(tmp_path / "s.parquet"), str(tmp_path / "out"), "--timeout-s", "inf"])
    assert exited.value.code == 2
    assert "timeout" in capsys.readouterr().err  # one line naming the option


# ---- broken URLs and broken HTTP ----------------------------------------------------------------

def test_non_ascii_path_is_percent_encoded_and_fetched(server):
    assert fetch(server.url("/café au lait.jpg"), opts()).data == b"CAFE"
    assert clean_url("http://bücher.example/ä?q=ü") == "http://xn--bcher-kva.example/%C3%A4?q=%C3%BC"


@pytest.mark.parametrize("url", ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "http://a\0b/x.jpg",
                                 "http://127.0.0.1/\0.jpg", "http://127.0.0.1/" + "a" * 5000, "http://\n/x", ""])
def test_broken_urls_are_bad_url(url):
    assert fetch(url, opts()).reason == "bad_url"
    assert url_skips(pa.array([url]), ("http", "https")).to_pylist() in (["bad_url"], [None])


@pytest.mark.parametrize("payload, reason", [
    (b"HTTP/1.1 abc\r\n\r\n", "bad_response"),
    (b"garbage\r\n\r\n", "bad_response"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", "bad_response"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 120 + b"\r\n", "bad_response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc", "truncated"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", "truncated"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "truncated"),
    (b"", "connection_error"),
])
def test_malformed_responses_are_recorded(payload, reason):
    server = scripted(payload)
    try:
        assert fetch(server.url(), opts()).reason == reason
    finally:
        server.close()


def test_exception_in_one_row_never_fails_the_shard(server, tmp_path, monkeypatch):
    real = ingest_module.process_image

    def explode(data, image_opts):
        if data == b"BOOM":
            raise RuntimeError("decoder bug")
        return real(data, image_opts)
    monkeypatch.setattr(ingest_module, "process_image", explode)
    urls = [server.add("/good.jpg", jpeg(20, 20)), server.add("/boom.jpg", b"BOOM"), "http://[::1/x.jpg",
            server.url("/café au lait.jpg")]
    source = write_table(tmp_path / "s.parquet", url=urls, label=["a"] * 4)
    out = str(tmp_path / "out")
    manifest = ingest(source, out)
    index = read_index(out)
    assert index.column("reason").to_pylist() == ["", "internal_error:RuntimeError", "bad_url", "not_an_image"]
    assert manifest["totals"]["train"]["ok"] == 1


# ---- retries ----------------------------------------------------------------------------------

def test_transient_failures_are_retried_with_backoff():
    with LoopbackServer() as s:
        s.add("/flaky.jpg", b"IMAGE", fail_first=2)
        s.add("/flaky2.jpg", b"IMAGE", fail_first=2)
        s.add("/busy.jpg", b"IMAGE", fail_first=1, fail_status=429, headers={"Retry-After": "1"})
        s.add("/gone.jpg", status=404)
        result = fetch(s.url("/flaky.jpg"), opts(retries=2, retry_backoff_s=0.05))
        assert (result.data, result.attempts) == (b"IMAGE", 3)
        result = fetch(s.url("/flaky2.jpg"), opts(retries=1, retry_backoff_s=0.05))
        assert (result.reason, result.attempts) == ("http_503", 2)
        start = time.monotonic()
        result = fetch(s.url("/busy.jpg"), opts(retries=1, retry_backoff_s=0.0))
        assert result.data == b"IMAGE" and 0.9 < time.monotonic() - start < 1.8  # Retry-After honoured
        assert fetch(s.url("/gone.jpg"), opts(retries=3)).attempts == 1  # permanent: one attempt
        assert s.hits["/gone.jpg"] == 1


def test_retry_after_is_capped_and_the_url_deadline_holds():
    with LoopbackServer() as s:
        s.add("/busy.jpg", b"IMAGE", fail_first=1, fail_status=429, headers={"Retry-After": "3600"})
        s.add("/down.jpg", b"IMAGE", fail_first=100)
        start = time.monotonic()
        assert fetch(s.url("/busy.jpg"), opts(retries=1, max_retry_after_s=0.2)).data == b"IMAGE"
        result = fetch(s.url("/down.jpg"), opts(retries=50, retry_backoff_s=0.2, deadline_s=2.0))
        assert result.reason == "http_503" and 2 <= result.attempts < 50
        assert time.monotonic() - start < 3.0


# ---- TLS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca, stranger = trustme.CA(), trustme.CA()
    ca_file = str(tmp_path_factory.mktemp("ca") / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    certs = {"good": ca.issue_cert("localhost"), "wrong_name": ca.issue_cert("other.example"),
             "expired": ca.issue_cert("localhost", not_before=past, not_after=past + datetime.timedelta(days=1)),
             "self_signed": stranger.issue_cert("localhost")}
    servers = {}
    for name, cert in certs.items():
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        servers[name] = LoopbackServer(ssl_context=context).start()
        servers[name].add("/img.jpg", b"SECURE")
    yield ca_file, servers
    for s in servers.values():
        s.stop()


def test_https_connects_to_the_checked_ip_and_verifies_the_host(tls):
    ca_file, servers = tls
    def get(name, **kw):
        return fetch(f"https://localhost:{servers[name].port}/img.jpg", opts(ca_file=ca_file, **kw))
    assert get("good").data == b"SECURE"
    assert fetch(f"https://localhost:{servers['good'].port}/img.jpg", opts()).reason == "tls_error"  # CA not added
    for name in ("wrong_name", "expired", "self_signed"):
        assert get(name).reason == "tls_error", name
    assert fetch(f"https://localhost:{servers['good'].port}/img.jpg",
                 FetchOptions(ca_file=ca_file, retries=0)).reason == "blocked_address"


def test_https_keep_alive_reuses_a_verified_connection_only(tls):
    ca_file, servers = tls
    good = LoopbackServer(ssl_context=servers["good"].ssl_context, keep_alive=True).start()
    try:
        good.add("/img.jpg", b"SECURE")
        with ConnectionPool() as pool:
            for _ in range(3):  # one handshake, then the verified connection serves the host again
                assert fetch(f"https://localhost:{good.port}/img.jpg", opts(ca_file=ca_file), pool).data == b"SECURE"
            assert good.connections == 1 and pool.reused == 2
            for _ in range(2):  # a failed verification leaves nothing in the pool to reuse
                assert fetch(f"https://localhost:{servers['wrong_name'].port}/img.jpg", opts(ca_file=ca_file),
                             pool).reason == "tls_error"
            assert pool.reused == 2
    finally:
        good.stop()


# ---- images -----------------------------------------------------------------------------------

def _small_jpeg(**kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 200)).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_originals_are_kept_only_without_extra_payload():
    options = ImageOptions(image_size=256)
    plain = _small_jpeg()
    assert plain_jpeg(plain) and process_image(plain, options).jpg == plain
    exif = Image.Exif()
    exif[0x8825] = {2: (48.0, 51.0, 24.0)}  # GPS latitude
    hostile = {"trailer": plain + b"\0" * 5_000_000, "second_image": plain + plain,
               "comment": plain[:2] + b"\xff\xfe\xff\xff" + b"c" * 65533 + plain[2:],
               "exif_gps": _small_jpeg(exif=exif.tobytes())}
    for name, data in hostile.items():
        result = process_image(data, options)
        assert result.jpg is not None and result.jpg != data, name
        assert len(result.jpg) < 10_000 and plain_jpeg(result.jpg), name
        stored = Image.open(io.BytesIO(result.jpg))
        assert not stored.getexif() and "comment" not in stored.info, name


def test_only_supported_formats_are_decoded():
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\n"
           b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")
    assert process_image(eps, ImageOptions()).reason == "not_an_image"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "TGA")
    assert process_image(buf.getvalue(), ImageOptions()).reason == "not_an_image"


def test_scheme_refusal_in_a_table_source_is_recorded(server, tmp_path):
    urls = [server.add("/fine.jpg", jpeg(20, 20)), "file:///etc/passwd", f"simplecache::{server.url('/fine.jpg')}"]
    source = write_table(tmp_path / "s.parquet", url=urls, label=["a"] * 3)
    out = str(tmp_path / "out")
    ingest(source, out, replace(CFG, []))
    assert read_index(out).column("reason").to_pylist() == ["", "refused_scheme", "refused_scheme"]
