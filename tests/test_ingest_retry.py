"""`--retry-failed`: only transient failures are fetched again, only their shards change, atomically."""

import json

import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from data_pipeline import dataset
from data_pipeline.config import ConfigError, replace
from data_pipeline.ingest import check_out_location, plan_shards
from data_pipeline.retry import retry_failed
from tests.conftest import noise_jpeg, solid_jpeg
from tests.http_server import LoopbackServer
from tests.test_ingest import CFG, ingest, read_index, write_table


def test_retry_failed_rewrites_only_the_shards_that_change(tmp_path):
    with LoopbackServer() as server:
        urls = [server.add(f"/ok{i}.jpg", solid_jpeg(20 + i, 20)) for i in range(4)]          # shard 0: all ok
        urls += [server.add("/a.jpg", solid_jpeg(30, 20)), server.add("/flaky.jpg", solid_jpeg(31, 20), fail_first=1),
                 server.url("/gone.jpg"), server.add("/busy.jpg", solid_jpeg(32, 20), fail_first=1, fail_status=429)]
        urls += [server.add(f"/down{i}.jpg", solid_jpeg(40 + i, 20), fail_first=1, fail_status=502)
                 for i in range(2)]                                                             # shard 2: none ok yet
        source = write_table(tmp_path / "s.parquet", url=urls, label=[f"c{i % 3}" for i in range(len(urls))])
        out = tmp_path / "out"
        first = ingest(source, str(out))
        assert first["totals"]["train"]["reasons"] == {"http_404": 1, "http_429": 1, "http_502": 2, "http_503": 1}
        untouched = (out / "shards" / "train-000000.tar").read_bytes()
        part0 = (out / "index" / "part-000000.parquet").read_bytes()

        assert main(["ingest", "--retry-failed", str(out), "--allow-network", "127.0.0.0/8", "--retries", "0"]) == 0
        manifest = dataset.read_manifest(str(out))
        assert manifest["totals"]["train"]["reasons"] == {"http_404": 1}
        assert manifest["retry_passes"][0] == {**manifest["retry_passes"][0], "rows_retried": 4,
                                                "rows_recovered": 4, "shards_rewritten": 2}
        assert server.hits["/gone.jpg"] == 1  # permanent: not asked again
        assert (out / "shards" / "train-000000.tar").read_bytes() == untouched
        assert (out / "index" / "part-000000.parquet").read_bytes() == part0
        assert dataset.verify_dataset(str(out)) == []
        index = read_index(str(out))
        assert index.column("attempts").to_pylist()[4:] == [1, 2, 1, 2, 2, 2]
        assert dataset.read_classes(str(out)).column("count").to_pylist() == [3, 3, 3]

        # what a run that got every transient row the first time writes: the same shards, byte for byte
        fresh = tmp_path / "fresh"
        ingest(source, str(fresh))
        for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
            assert (out / "shards" / name).read_bytes() == (fresh / "shards" / name).read_bytes(), name
        assert pq.read_table(str(out / "classes.parquet")).equals(pq.read_table(str(fresh / "classes.parquet")))


def test_timing_options_never_refuse_the_output(tmp_path, http_server):
    source = write_table(tmp_path / "s.parquet", url=[http_server.add("/t.jpg", solid_jpeg(20, 20))], label=["a"])
    ingest(source, str(tmp_path / "out"))
    again = replace(CFG, ["fetch.timeout_s=5", "fetch.deadline_s=60", "fetch.retries=4", "fetch.threads=2"])
    check_out_location(plan_shards(source, str(tmp_path / "out"), again))  # no error


def test_retry_failed_on_a_detection_dataset_adds_the_boxes_of_recovered_images(tmp_path):
    with LoopbackServer() as server:
        server.add("/img/a.jpg", noise_jpeg(1, 64, 48))
        server.add("/img/b.jpg", noise_jpeg(2, 80, 40), fail_first=1)  # 503 once, then the image
        doc = {"categories": [{"id": 1, "name": "zebra"}, {"id": 2, "name": "apple"}],
               "images": [{"id": 5, "file_name": "img/a.jpg"}, {"id": 6, "file_name": "img/b.jpg"},
                          {"id": 7, "file_name": "img/gone.jpg"}],
               "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10]},
                               {"id": 2, "image_id": 6, "category_id": 2, "bbox": [70, 4, 20, 8]},   # clipped
                               {"id": 3, "image_id": 6, "category_id": 1, "bbox": [2, 2, 4, 4], "iscrowd": 1}]}
        source = server.add("/ann.json", json.dumps(doc).encode())
        out = tmp_path / "out"
        first = ingest(source, str(out))
        assert first["task"] == "detection" and first["totals"]["train"]["reasons"] == {"http_404": 1, "http_503": 1}
        assert first["detection"]["all"] == {"boxes": 1, "crowd": 0, "clipped": 0, "degenerate": 0}

        assert main(["ingest", "--retry-failed", str(out), "--allow-network", "127.0.0.0/8", "--retries", "0"]) == 0
        manifest = dataset.read_manifest(str(out))
        assert manifest["totals"]["train"]["reasons"] == {"http_404": 1}
        assert manifest["detection"]["all"] == {"boxes": 2, "crowd": 1, "clipped": 1, "degenerate": 0}
        assert dataset.read_classes(str(out)).column("count").to_pylist() == [1, 1]  # apple, zebra: boxes
        assert dataset.verify_dataset(str(out)) == []
        samples = {json.loads(s["json"])["image_id"]: json.loads(s["json"])
                   for s in dataset.iter_shard(str(out / "shards" / "train-000000.tar"))}
        assert samples[6]["labels"] == [0, 1] and samples[6]["iscrowd"] == [0, 1]

        fresh = tmp_path / "fresh"  # what a run that got b.jpg the first time writes
        assert ingest(source, str(fresh))["detection"] == manifest["detection"]
        assert (out / "shards" / "train-000000.tar").read_bytes() == (fresh / "shards" / "train-000000.tar").read_bytes()
        assert pq.read_table(str(out / "classes.parquet")).equals(pq.read_table(str(fresh / "classes.parquet")))
        old = fresh / "index" / "part-000000.parquet"  # as written before index parts carried the boxes
        pq.write_table(pq.read_table(str(old)).drop_columns(["objects", "image_id"]), str(old))
        with pytest.raises(ConfigError, match="no 'objects' column"):
            retry_failed(str(fresh), CFG)
