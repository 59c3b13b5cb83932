"""The dataset report: numbers that match the index, hostile labels kept inert, object stores, a real browser.

A small long-tailed dataset is ingested from a loopback server (two hosts: 127.0.0.1 serves, 127.0.0.2
refuses connections), with failures of several kinds and a label written by an attacker.
"""

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from data_pipeline import dataset
from data_pipeline.config import replace
from data_pipeline.ingest import IngestConfig, check_out_location, finalize, plan_shards, write_shard
from data_pipeline.report import HTML_FILE, JSON_FILE, REPORT_DIR, ReportOptions, gather_report, write_report
from tests.conftest import solid_jpeg
from tests.http_server import LoopbackServer

CFG = replace(IngestConfig(), ["fetch.allow_networks=[127.0.0.0/8]", "fetch.timeout_s=2.0", "fetch.threads=8",
                               "image.image_size=48", "output.shard_size=16", "output.max_failed_fraction=1.0"])
HOSTILE = '<img src=x onerror="alert(1)"></title><script>alert(2)</script>'
CLASS_SIZES = {"cat": 14, "dog": 7, "bird": 3, "fox": 1, "owl": 1, HOSTILE: 1}
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "report.png"


def ingest(source: str, out: str) -> dict:
    plan = plan_shards(source, out, CFG)
    check_out_location(plan)
    return finalize(plan, [write_shard(plan.task(i), CFG) for i in range(plan.num_tasks)], CFG)


def read_index(root: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(dataset.join(root, dataset.INDEX_DIR))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in sorted(fs.ls(path, detail=False))])


def write_source(server: LoopbackServer, path: Path) -> str:
    urls, labels = [], []
    for c, (label, size) in enumerate(CLASS_SIZES.items()):
        for i in range(size):
            color = (40 * c % 256, 255 - 30 * c % 256, (17 * i) % 256)
            urls.append(server.add(f"/{c}/{i}.jpg", solid_jpeg(40 + 8 * (i % 4), 30 + 6 * c, color)))
            labels.append(label)
    failures = [(server.url("/gone.jpg"), "ghost"), (server.url("/gone2.jpg"), "cat"),
                (server.add("/page", b"<html></html>", content_type="text/html"), "dog"),
                (server.add("/tiny.jpg", solid_jpeg(4, 4, (0, 0, 0))), "bird"),
                (server.url("/0/0.jpg").replace("127.0.0.1", "127.0.0.2"), "cat"),
                (server.url("/0/1.jpg").replace("127.0.0.1", "127.0.0.2"), "ghost"),
                ("ftp//broken", "cat"), ("http://<b>x</b>/a.jpg", "dog")]
    urls += [u for u, _ in failures]
    labels += [lb for _, lb in failures]
    pq.write_table(pa.table({"url": urls, "label": labels}), str(path))
    return str(path)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, http_server):
    """A local dataset and the same rows in memory://."""
    tmp = tmp_path_factory.mktemp("report")
    source = write_source(http_server, tmp / "src.parquet")
    local = str(tmp / "ds")
    ingest(source, local)
    ingest(source, "memory://report-ds")
    return local


def test_report_numbers_match_the_index(ingested):
    data = gather_report(ingested, ReportOptions(num_classes_shown=3, thumbs_per_class=4))
    index = read_index(ingested)
    classes = dataset.read_classes(ingested)

    assert data["classes"]["counts_desc"] == sorted(classes.column("count").to_pylist(), reverse=True)
    assert data["classes"]["counts_desc"][:3] == [14, 7, 3] and data["classes"]["num_empty"] == 1  # ghost
    by_reason = {(r["status"], r["reason"]): r["rows"] for r in data["reasons"]}
    expected = pc.value_counts(pc.binary_join_element_wise(index["status"], pc.fill_null(index["reason"], ""), "/"))
    assert {tuple(v["values"].split("/")): v["counts"] for v in expected.to_pylist()} == by_reason
    assert by_reason[("ok", "")] == sum(CLASS_SIZES.values()) and by_reason[("failed", "http_404")] == 2

    domains = {d["domain"]: d for d in data["domains"]}
    assert sum(d["rows"] for d in data["domains"]) == index.num_rows
    assert all(d["rows"] == d["ok"] + d["failed"] + d["skipped"] for d in data["domains"])
    assert domains["127.0.0.1"]["rows"] == 31 and domains["127.0.0.1"]["ok"] == 27
    assert domains["127.0.0.1"]["reasons"] == {"http_404": 2, "not_an_image": 1, "too_small": 1}
    unreachable = domains["127.0.0.2"]
    assert unreachable["rows"] == 2 and unreachable["ok"] == 0 and sum(unreachable["reasons"].values()) == 2
    assert domains["(no host)"]["reasons"] == {"bad_url": 1}
    assert "<b>x<" in domains  # the attacker's host is reported as given, escaped only when rendered

    ok = index.filter(pc.equal(index["status"], "ok"))
    widths = data["sizes"]["width_px"]
    assert widths["count"] == ok.num_rows and widths["max"] == pc.max(ok["width"]).as_py()
    assert sum(widths["counts"]) == ok.num_rows

    largest = [(c["name"], c["count"], len(c["thumbs"])) for c in data["largest"]]
    assert largest == [("cat", 14, 4), ("dog", 7, 4), ("bird", 3, 3)]
    rarest = [(c["name"], len(c["thumbs"])) for c in data["rarest"]]
    assert sorted(rarest) == sorted([("fox", 1), ("owl", 1), (HOSTILE, 1)])
    thumb = Image.open(io.BytesIO(base64.b64decode(data["largest"][0]["thumbs"][0].split(",", 1)[1])))
    assert max(thumb.size) <= 96 and data["problems"] == []


def test_page_is_self_contained_and_hostile_labels_stay_text(ingested, tmp_path):
    page_url = write_report(ingested, str(tmp_path / "out"))
    page = Path(page_url).read_text(encoding="ascii")
    assert "Content-Security-Policy" in page and "script-src" not in page  # default-src 'none': no script runs
    assert "<script" not in page and "onerror=\"" not in page and HOSTILE not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page and "<td class=l>&lt;b&gt;x&lt;</td>" in page
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(sources) == 3 + (8 + 7 + 3) + 3 and all(s.startswith("data:image/") for s in sources)  # plots, thumbs
    summary = json.loads((tmp_path / "out" / JSON_FILE).read_text())
    assert summary["largest"][0] == {"id": summary["largest"][0]["id"], "name": "cat", "count": 14, "thumbs": 8}


def test_cli_on_an_object_store_and_its_errors(ingested, capsys):
    assert main(["report", "memory://report-ds"]) == 0
    page_url = capsys.readouterr().out.strip()
    assert page_url == f"memory://report-ds/{REPORT_DIR}/{HTML_FILE}"
    with fsspec.open(page_url, "r") as f:
        assert "dataset report" in f.read()
    assert json.loads(fsspec.open(f"memory://report-ds/{REPORT_DIR}/{JSON_FILE}").open().read())["dataset"]["num_classes"] == 7

    assert main(["report", "memory://no-such-dataset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DATASET" in err[0] and "manifest.json" in err[0]
    assert main(["report", ingested, "--thumbs", "0"]) == 2
    assert "--thumbs" in capsys.readouterr().err


def test_altered_and_corrupt_samples_are_reported_not_fatal(ingested, tmp_path):
    root = str(tmp_path / "ds")
    shutil.copytree(ingested, root)
    shard = dataset.split_shards(root, "train")[0][0]
    samples = list(dataset.iter_shard(shard))
    samples[0]["jpg"] = solid_jpeg(20, 20, (0, 255, 0))   # valid JPEG, but not the bytes the index recorded
    samples[1]["jpg"] = b"\xff\xd8 not really a jpeg"
    dataset.write_shard(shard, samples)
    data = gather_report(root, ReportOptions(thumbs_per_class=16))
    problems = "\n".join(data["problems"])
    assert f"{samples[0]['__key__']}: image bytes differ from the sha256 in the index" in problems
    assert f"{samples[1]['__key__']}: image bytes differ" in problems  # checked before any decode
    assert sum(len(c["thumbs"]) for c in data["largest"] + data["rarest"]) == sum(CLASS_SIZES.values()) - 2


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))


@pytest.mark.slow
def test_page_in_a_real_browser(ingested, tmp_path):
    page_url = write_report(ingested, str(tmp_path / "out"))
    driver = _chromium()
    try:
        driver.get(Path(page_url).as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        assert driver.title.startswith("dataset report")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) == 3 + (8 + 7 + 3) + 3
        assert all(done and w > 0 and h > 0 for done, w, h in images), images
        headings = driver.execute_script("return Array.from(document.querySelectorAll('h3')).map(h => h.textContent)")
        assert any(HOSTILE in h for h in headings)  # shown as text, never run
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, min(height + 150, 6000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == []
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("MEGACLASS_DOCS_SCREENSHOT"):  # refresh the picture in docs/report.md
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
