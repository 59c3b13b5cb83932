"""Ingestion steps without Ray: source checks, accounting, index, classes, manifest, resume, memory://.

The Ray runner calls exactly these functions (plan_shards, write_shard, finalize) as tasks;
tests/test_ingest_ray.py covers the runner, the CLI and crash recovery.
"""

import io
import json
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from data_pipeline import dataset
from data_pipeline.config import ConfigError, replace
from data_pipeline.ingest import IngestConfig, IngestError, ShardResult, check_out_location, finalize, plan_shards, write_shard
from data_pipeline.source import SourceError
from tests.conftest import encode_image, noise_jpeg, solid_jpeg

CFG = replace(IngestConfig(), ["fetch.allow_networks=[127.0.0.0/8]", "fetch.timeout_s=1.0", "fetch.threads=4",
                               "fetch.retries=0",
                               "image.image_size=32", "output.shard_size=4", "output.max_failed_fraction=1.0"])


def ingest(source: str, out: str, cfg: IngestConfig = CFG) -> dict:
    plan = plan_shards(source, out, cfg)
    check_out_location(plan)
    return finalize(plan, [write_shard(plan.task(i), cfg) for i in range(plan.num_tasks)], cfg)


def write_table(path, **columns) -> str:
    pq.write_table(pa.table(columns), str(path))
    return str(path)


@pytest.fixture
def mixed_source(http_server, tmp_path):
    """One row per outcome; returns (source path, expected reason per row)."""
    rows = [
        (http_server.add("/a.jpg", solid_jpeg(40, 30)), "cat", ""),
        (http_server.add("/b.jpg", solid_jpeg(300, 100)), "dog", ""),
        (http_server.add("/c.png", encode_image(Image.new("RGBA", (20, 20), (0, 0, 255, 255)), "PNG")), "dog", ""),
        (http_server.url("/a.jpg"), "cat", "duplicate_url"),
        (http_server.url("/gone.jpg"), "cat", "http_404"),
        (http_server.add("/e500", status=500), "cat", "http_500"),
        (http_server.add("/html", b"<html></html>", content_type="text/html"), "bird", "not_an_image"),
        (http_server.add("/tiny.jpg", solid_jpeg(8, 8)), "bird", "too_small"),
        (http_server.add("/trunc.jpg", noise_jpeg(1, 64, 64)[:-300]), "bird", "truncated"),
        (http_server.add("/noai.jpg", solid_jpeg(20, 20), headers={"X-Robots-Tag": "noai"}), "bird", "opt_out"),
        (http_server.add("/slow.jpg", solid_jpeg(20, 20), delay_s=2.0), "bird", "timeout"),
        (http_server.add("/loop", status=302, location="/loop2"), "bird", ""),
        ("ftp//broken", "cat", "bad_url"),
        (http_server.add("/nolabel.jpg", solid_jpeg(20, 20)), None, "missing_label"),
        ("http://10.0.0.1/x.jpg", "cat", "blocked_address"),
    ]
    http_server.add("/loop2", status=302, location="/loop")
    reasons = [r for _, _, r in rows]
    reasons[11] = "redirect_loop"
    path = write_table(tmp_path / "src.parquet", url=[u for u, _, _ in rows], label=[lb for _, lb, _ in rows])
    return path, reasons


def put(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def read_index(root: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(dataset.join(root, dataset.INDEX_DIR))
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts]).sort_by("source_row")


def test_every_row_accounted_with_its_reason(mixed_source, tmp_path):
    source, reasons = mixed_source
    out = str(tmp_path / "out")
    manifest = ingest(source, out)
    index = read_index(out)
    assert index.num_rows == len(reasons)
    assert index.column("reason").to_pylist() == reasons
    statuses = index.column("status").to_pylist()
    assert statuses[:3] == ["ok"] * 3 and statuses.count("ok") == 3
    assert {s for s, r in zip(statuses, reasons) if r in ("duplicate_url", "bad_url", "missing_label")} == {"skipped"}
    totals = manifest["totals"]["train"]
    assert (totals["rows"], totals["ok"], totals["failed"], totals["skipped"]) == (15, 3, 9, 3)
    assert totals["reasons"]["http_404"] == 1 and any("duplicate_url" in line for line in manifest["summary"])
    assert dataset.verify_dataset(out) == []

    samples = [s for name, _ in dataset.split_shards(out, "train") for s in dataset.iter_shard(name)]
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert dataset.class_names(out) == ["bird", "cat", "dog"]
    assert [int(s["cls"]) for s in samples] == [1, 2, 2]
    assert json.loads(samples[1]["json"])["width"] == 300
    assert Image.open(io.BytesIO(samples[1]["jpg"])).size == (96, 32)
    assert dataset.sha256_bytes(samples[0]["jpg"]) == index.column("sha256")[0].as_py()
    classes = dataset.read_classes(out)
    assert classes.column("count").to_pylist() == [0, 1, 2]

    info = dataset.read_json(dataset.join(out, dataset.INFO_FILE))
    assert info["splits"]["train"]["num_samples"] == 3


def test_outputs_are_a_pure_function_of_inputs_and_resume(mixed_source, tmp_path):
    source, _ = mixed_source
    cfg = replace(CFG, ["fetch.timeout_s=0.3"])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ingest(source, a, cfg)
    plan = plan_shards(source, b, cfg)
    first = write_shard(plan.task(0), cfg)
    assert not first.skipped_existing and write_shard(plan.task(0), cfg).skipped_existing
    ingest(source, b, cfg)  # resumes: task 0 is skipped, the others run
    for sub in ("manifest.json", "_info.json", "classes.parquet", "shards/train-000000.tar", "index/part-000001.parquet"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes(), sub


def test_output_of_other_inputs_is_refused(mixed_source, tmp_path):
    source, _ = mixed_source
    out = str(tmp_path / "out")
    ingest(source, out, replace(CFG, ["fetch.timeout_s=0.3"]))
    with pytest.raises(ConfigError, match="another source or other options"):
        check_out_location(plan_shards(source, out, replace(CFG, ["image.image_size=64"])))
    with pytest.raises(ConfigError, match="another source or other options"):  # the filter changes every sample
        check_out_location(plan_shards(source, out, replace(CFG, ["image.resample=bicubic"])))


def test_held_out_split_by_key_hash(http_server, tmp_path):
    urls = [http_server.add(f"/s{i}.jpg", solid_jpeg(20, 20, (i * 7 % 255, 0, 0))) for i in range(40)]
    source = write_table(tmp_path / "s.parquet", url=urls, label=[f"c{i % 3}" for i in range(40)],
                         key=[f"k{i}" for i in range(40)])
    cfg = replace(CFG, ["output.val_fraction=0.3", "output.shard_size=10"])
    out = str(tmp_path / "out")
    manifest = ingest(source, out, cfg)
    train, val = manifest["totals"]["train"], manifest["totals"]["val"]
    assert train["rows"] + val["rows"] == 40 and 4 <= val["rows"] <= 20
    assert train["ok"] == train["rows"] and val["ok"] == val["rows"]
    val_keys = {s["__key__"] for url, _ in dataset.split_shards(out, "val") for s in dataset.iter_shard(url)}
    again = plan_shards(source, str(tmp_path / "other"), cfg)
    assert val_keys == {k for t in again.tasks() if t.split == "val" for k in t.rows.column("key").to_pylist()}


def test_image_folder_source(tmp_path):
    for label in ("zebra", "ant"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "folder" / label / f"{i}.jpg").write_bytes(solid_jpeg(32, 32))
    (tmp_path / "folder" / "ant" / "notes.txt").write_text("hello")
    out = str(tmp_path / "out")
    manifest = ingest(str(tmp_path / "folder"), out)
    assert dataset.class_names(out) == ["ant", "zebra"]
    assert manifest["totals"]["train"]["ok"] == 4 and manifest["totals"]["train"]["reasons"] == {"not_an_image": 1}


def test_memory_filesystem_source_images_and_output():
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/w1src/img{i}.jpg", solid_jpeg(24, 24))
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": [f"memory://w1src/img{i}.jpg" for i in range(3)] + ["memory://w1src/none.jpg"],
                             "label": ["a", "b", "a", "b"]}), buf)
    fs.pipe("/w1src/table.parquet", buf.getvalue())
    out = "memory://w1out"
    with pytest.raises(SourceError, match="allow_schemes"):  # a table names http(s) URLs unless opened
        plan_shards("memory://w1src/table.parquet", out, CFG)
    manifest = ingest("memory://w1src/table.parquet", out, replace(CFG, ["fetch.allow_schemes=[memory]"]))
    assert manifest["totals"]["train"]["ok"] == 3 and manifest["totals"]["train"]["reasons"] == {"not_found": 1}
    assert dataset.verify_dataset(out) == []
    assert sum(n for _, n in dataset.split_shards(out, "train")) == 3
    fs.rm("/w1src", recursive=True)
    fs.rm("/w1out", recursive=True)


def test_120k_classes_without_per_class_work(tmp_path):
    num_classes, num_images = 120_000, 200
    for i in range(num_images):
        (tmp_path / f"{i}.jpg").write_bytes(solid_jpeg(16, 16))
    # Every row its own class; 200 distinct images, the other rows repeat a URL (cheap skips).
    labels = [f"class-{i:06d}" for i in range(num_classes)][::-1]
    urls = [f"file://{tmp_path}/{i % num_images}.jpg" for i in range(num_classes)]
    source = write_table(tmp_path / "big.parquet", url=urls, label=labels)
    cfg = replace(CFG, ["output.shard_size=30000", "fetch.allow_schemes=[file]"])
    start = time.monotonic()
    out = str(tmp_path / "out")
    manifest = ingest(source, out, cfg)
    elapsed = time.monotonic() - start
    classes = dataset.read_classes(out)
    assert manifest["num_classes"] == classes.num_rows == num_classes
    assert classes.column("id").to_pylist() == list(range(num_classes))
    assert classes.column("name").to_pylist() == sorted(labels)
    assert classes.column("count").to_numpy().sum() == num_images
    assert manifest["totals"]["train"]["reasons"] == {"duplicate_url": num_classes - num_images}
    sample = next(dataset.iter_shard(dataset.split_shards(out, "train")[0][0]))
    assert int(sample["cls"]) == sorted(labels).index(json.loads(sample["json"])["label"])
    assert elapsed < 60, elapsed

    # The merge alone at 120k classes x 1,000 shards (120 classes each): linear, well under seconds.
    plan = plan_shards(source, str(tmp_path / "x"), cfg)
    plan.split_rows = {"train": 1000 * plan.shard_size}
    fake = [ShardResult(i, "train", None, 120, {"ok": 120}, {}, list(range(i * 120, i * 120 + 120)), [1] * 120)
            for i in range(1000)]
    start = time.monotonic()
    finalize(plan, fake, cfg)
    assert time.monotonic() - start < 5
    assert dataset.read_classes(str(tmp_path / "x")).column("count").to_pylist() == [1] * num_classes


@pytest.mark.parametrize("build, message", [
    (lambda p: write_table(p / "t.parquet", link=["http://a/b.jpg"], label=["x"]), "missing column"),
    (lambda p: write_table(p / "t.parquet", url=pa.array([], pa.string()), label=pa.array([], pa.string())), "zero rows"),
    (lambda p: put(p / "t.parquet", "garbage"), "cannot read"),
    (lambda p: str(p / "missing.parquet"), "not found"),
    (lambda p: write_table(p / "t.parquet", url=["::::", "no url"], label=["x", "y"]), "no usable URL"),
    (lambda p: write_table(p / "t.parquet", url=[1, 2], label=["x", "y"]), "no usable URL"),
    (lambda p: write_table(p / "t.parquet", url=["http://a/1", "http://a/2"], label=["x", "y"], key=["k", "k"]),
     "duplicate"),
    (lambda p: write_table(p / "t.parquet", url=["http://a/1"], label=["x"], key=["a.b"]), "key"),
    (lambda p: put(p / "t.txt", "x"), "unknown table type"),
    (lambda p: put(p / "t.csv", "url,label\n"), "zero rows"),
    (lambda p: put(p / "t.jsonl", '{"url": "http://a/1"}\n'), "missing column"),
])
def test_bad_sources_fail_before_any_work(tmp_path, capsys, build, message):
    source = build(tmp_path)
    with pytest.raises(SourceError, match=message):
        plan_shards(source, str(tmp_path / "out"), CFG)
    assert main(["ingest", source, str(tmp_path / "out2")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_csv_and_jsonl_sources(http_server, tmp_path):
    url = http_server.add("/csv.jpg", solid_jpeg(20, 20))
    (tmp_path / "t.csv").write_text(f"url,label\n{url},1\n{url}x,2\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"url": url, "label": "a"}) + "\n")
    assert ingest(str(tmp_path / "t.csv"), str(tmp_path / "o1"))["totals"]["train"]["reasons"] == {"http_404": 1}
    assert dataset.class_names(str(tmp_path / "o1")) == ["1", "2"]
    assert ingest(str(tmp_path / "t.jsonl"), str(tmp_path / "o2"))["totals"]["train"]["ok"] == 1


def test_failed_fraction_fails_loudly(http_server, tmp_path):
    source = write_table(tmp_path / "s.parquet", url=[http_server.url(f"/none{i}") for i in range(3)], label=["a"] * 3)
    with pytest.raises(IngestError, match="max_failed_fraction"):
        ingest(source, str(tmp_path / "out"), replace(CFG, ["output.max_failed_fraction=0.5"]))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_options_layering(tmp_path, capsys):
    import argparse

    from cluster.commands import ingest as command

    (tmp_path / "c.yaml").write_text("image:\n  image_size: 64\n  jpeg_quality: 80\noutput:\n  shard_size: 7\n")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["s.parquet", "out", "--config", str(tmp_path / "c.yaml"), "--image-size", "96",
                              "--allow-network", "10.0.0.0/8", "--allow-network", "127.0.0.0/8",
                              "--set", "output.shard_size=9", "--ignore-optout"])
    cfg = command.build_config(args)
    assert (cfg.image.image_size, cfg.image.jpeg_quality, cfg.output.shard_size) == (96, 80, 9)
    assert cfg.fetch.allow_networks == ("10.0.0.0/8", "127.0.0.0/8") and not cfg.fetch.honour_optout
    with pytest.raises(ConfigError, match="image.bogus"):
        command.build_config(parser.parse_args(["s", "o", "--set", "image.bogus=1"]))
    with pytest.raises(ConfigError, match="image.resample: must be one of bilinear, bicubic"):
        command.build_config(parser.parse_args(["s", "o", "--set", "image.resample=cubic"]))
    with pytest.raises(ConfigError, match="allow_networks"):
        command.build_config(parser.parse_args(["s", "o", "--allow-network", "nonsense"]))
    assert main(["ingest", "--list-options"]) == 0 and "fetch.timeout_s" in capsys.readouterr().out
    assert main(["ingest", "--verify", str(tmp_path)]) == 1


def test_shard_tar_is_webdataset_layout_byte_for_byte(tmp_path):
    import random

    import webdataset as wds

    rng = random.Random(0)
    samples = [dataset.encode_sample(f"{i:09d}", rng.randbytes(rng.randint(0, 3000)), i % 7,
                                     {"url": f"http://h/\u00e9{i}", "label": "x"}) for i in range(50)]
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=dataset.SHARD_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
    record = dataset.write_shard(str(tmp_path / "s.tar"), samples)
    assert (tmp_path / "s.tar").read_bytes() == buf.getvalue() and record.num_samples == 50
    assert [s["__key__"] for s in dataset.iter_shard(str(tmp_path / "s.tar"))] == [s["__key__"] for s in samples]


def test_ingest_command_and_shard_writer_import_no_torch():
    """`megaclass ingest` and its Ray workers start in a fraction of a second, not torch's seconds."""
    import subprocess
    import sys

    code = ("import sys\nfrom cluster.cli import build_parser\nbuild_parser(['ingest', 'a', 'b'])\n"
            "import cluster.ingest_runner, data_pipeline.ingest, data_pipeline.retry\n"
            "print(sorted(m for m in ('torch', 'webdataset', 'timm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
