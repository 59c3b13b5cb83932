"""Sources as people have them: parts in folders, globs and lists, renamed and kept columns, --plan-only."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from data_pipeline import dataset
from data_pipeline.config import replace
from data_pipeline.source import SourceError
from tests.conftest import solid_jpeg
from tests.test_ingest import CFG, ingest, read_index

LAION = ["source.url_column=URL", "source.label_column=TEXT", "source.key_column=SAMPLE_ID",
         "source.keep_columns=[caption,NSFW,similarity]", "output.shard_size=3"]


def laion_parts(server, folder, num_parts=3, rows_per_part=4, with_keys=True):
    """LAION-style parquet parts; the last row of each later part repeats a URL of part 0."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(num_parts):
        urls = [server.add(f"/p{p}-{i}.jpg", solid_jpeg(20 + i, 20, (40 * p, 10 * i, 90))) for i in range(rows_per_part)]
        if p:
            urls[-1] = server.url("/p0-0.jpg")
        columns = {"URL": urls, "TEXT": [f"c{(p + i) % 3}" for i in range(rows_per_part)],
                   "caption": [f"a photo {p}-{i}" for i in range(rows_per_part)],
                   "NSFW": ["UNLIKELY"] * rows_per_part,
                   "similarity": pa.array([0.25 + i / 10 for i in range(rows_per_part)], pa.float64())}
        if with_keys:
            columns["SAMPLE_ID"] = [f"s{p}_{i}" for i in range(rows_per_part)]
        pq.write_table(pa.table(columns), str(folder / f"part-{p:05d}.parquet"))
    return folder


def test_folder_of_parts_with_renamed_and_kept_columns(http_server, tmp_path):
    parts = laion_parts(http_server, tmp_path / "laion")
    out = str(tmp_path / "out")
    manifest = ingest(str(parts), out, replace(CFG, LAION))
    index = read_index(out)
    assert index.num_rows == 12 and manifest["totals"]["train"]["ok"] == 10
    assert manifest["totals"]["train"]["reasons"] == {"duplicate_url": 2}  # across parts, first wins
    reasons = dict(zip(index.column("key").to_pylist(), index.column("reason").to_pylist()))
    assert sorted(k for k, r in reasons.items() if r == "duplicate_url") == ["s1_3", "s2_3"]  # the repeats, exactly
    assert index.column("key").to_pylist()[:5] == ["s0_0", "s0_1", "s0_2", "s0_3", "s1_0"]
    assert index.schema.field("similarity").type == pa.float64() and index.column("NSFW")[0].as_py() == "UNLIKELY"
    samples = [s for url, _ in dataset.split_shards(out, "train") for s in dataset.iter_shard(url)]
    meta = json.loads(samples[1]["json"])
    assert meta["caption"] == "a photo 0-1" and meta["similarity"] == pytest.approx(0.35) and meta["NSFW"] == "UNLIKELY"
    assert dataset.verify_dataset(out) == []

    # the same parts as a glob and as a list plan the same rows into the same shards
    by_glob = ingest(str(parts / "part-*.parquet"), str(tmp_path / "glob"), replace(CFG, LAION))
    listed = ",".join(str(p) for p in sorted(parts.glob("*.parquet")))
    by_list = ingest(listed, str(tmp_path / "list"), replace(CFG, LAION))
    assert by_glob["splits"] == by_list["splits"] == manifest["splits"]


def test_generated_keys_are_unique_across_parts_and_stable(http_server, tmp_path):
    parts = laion_parts(http_server, tmp_path / "laion", with_keys=False)
    cfg = replace(CFG, [c for c in LAION if "key_column" not in c])
    ingest(str(parts), str(tmp_path / "a"), cfg)
    keys = read_index(str(tmp_path / "a")).column("key").to_pylist()
    assert keys == [f"{i:09d}" for i in range(12)]
    ingest(str(parts), str(tmp_path / "b"), cfg)
    for name in ("manifest.json", "shards/train-000000.tar", "index/part-000001.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("change, message", [
    (["source.keep_columns=[caption,LICENSE]"], "LICENSE (--keep-columns)"),
    (["source.url_column=link"], "link (--url-col)"),
    (["source.label_column=cls"], "cls (--label-col)"),
])
def test_missing_columns_are_one_error_before_work(http_server, tmp_path, capsys, change, message):
    parts = laion_parts(http_server, tmp_path / "laion", num_parts=1)
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ingest(str(parts), str(tmp_path / "out"), replace(CFG, LAION + change))
    assert not (tmp_path / "out").exists()


def test_keys_repeated_across_parts_and_mixed_folders_are_refused(http_server, tmp_path):
    parts = laion_parts(http_server, tmp_path / "laion", num_parts=2)
    table = pq.read_table(str(parts / "part-00001.parquet"))
    keys = table.column("SAMPLE_ID").to_pylist()
    keys[2] = "s0_1"
    pq.write_table(table.set_column(table.schema.get_field_index("SAMPLE_ID"), "SAMPLE_ID", pa.array(keys)),
                   str(parts / "part-00001.parquet"))
    with pytest.raises(SourceError, match="across parts"):
        ingest(str(parts), str(tmp_path / "out"), replace(CFG, LAION))
    mixed = laion_parts(http_server, tmp_path / "mixed", num_parts=1)
    (mixed / "cat").mkdir()
    (mixed / "cat" / "1.jpg").write_bytes(solid_jpeg(20, 20))
    with pytest.raises(SourceError, match="both table files"):
        ingest(str(mixed), str(tmp_path / "out2"), CFG)
    with pytest.raises(SourceError, match="matches no"):
        ingest(str(tmp_path / "nothing-*.parquet"), str(tmp_path / "out3"), CFG)


def test_plan_only_prints_the_plan_and_fetches_nothing(http_server, tmp_path, capsys):
    parts = laion_parts(http_server, tmp_path / "laion")
    hits = sum(http_server.hits.values())
    code = main(["ingest", str(parts), str(tmp_path / "out"), "--plan-only", "--url-col", "URL", "--label-col", "TEXT",
                 "--key-col", "SAMPLE_ID", "--keep-columns", "caption,NSFW", "--shard-size", "5"])
    printed = capsys.readouterr().out
    assert code == 0 and sum(http_server.hits.values()) == hits and not (tmp_path / "out").exists()
    for line in ("rows      12", "parts     3", "classes   3", "shards    3", "duplicate_url"):
        assert line in printed, printed
