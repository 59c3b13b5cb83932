"""The reader's contract: equal batch counts per rank, disjoint slots, determinism, exact resume,
bad samples counted, memory:// datasets, and the same shards readable by timm and plain tarfile."""

from __future__ import annotations

import collections
import io
import random
import tarfile

import fsspec
import pytest
import torch
from PIL import Image

from data_pipeline import dataset as ds
from data_pipeline.reader import create_loader, dataset_info, num_classes, plan_slots
from data_pipeline.transforms import (IMAGENET_MEAN, IMAGENET_STD, create_eval_transform, create_train_transform,
                                      normalize)
from tests.conftest import noise_jpeg
from tests.dataset_factory import make_dataset

SHARD_SIZES = [7, 3, 12, 5, 9]  # 36 samples, unequal shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), SHARD_SIZES, num_classes=5, image_size=32)


def _load(root, *, rank=0, world_size=1, num_workers=2, epoch=0, skip=0, **kw):
    kw.setdefault("batch_size_per_rank", 4)
    kw.setdefault("transform", create_train_transform(16))
    loader = create_loader(root, "train", rank=rank, world_size=world_size, num_workers=num_workers,
                           seed=3, epoch=epoch, shuffle_buffer=kw.pop("shuffle_buffer", 8), skip_batches=skip, **kw)
    return loader, list(loader)


def test_equal_batch_counts_and_disjoint_ranks(dataset):
    per_rank = []
    for rank in range(2):
        loader, batches = _load(dataset, rank=rank, world_size=2)
        assert len(loader) == 36 // (2 * 4) == len(batches)
        assert all(b.images.shape == (4, 3, 16, 16) and b.images.dtype == torch.uint8 for b in batches)
        assert all(b.labels.dtype == torch.int64 and len(b.keys) == 4 for b in batches)
        # rank batch i comes from worker i % 2: both workers of both ranks delivered data
        assert batches[0].keys and batches[1].keys
        per_rank.append([k for b in batches for k in b.keys])
    # 5 shards >= 4 slots: each slot owns whole shards, so ranks never share a sample
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) >= 30  # 32 drawn of 36; at most a few repeats from cycling


def test_fewer_shards_than_slots_strides_samples(tmp_path):
    root = make_dataset(tmp_path / "ds", [10, 6], num_classes=3, image_size=24)
    slots = plan_slots(ds.split_shards(root, "train"), 4, seed=0, epoch=0, shuffle=True)
    assert all(slots) and sorted(sum(p.num_samples for p in s) for s in slots) == [3, 3, 5, 5]
    keys = []
    for rank in range(2):
        loader, batches = _load(root, rank=rank, world_size=2, batch_size_per_rank=2)
        assert len(batches) == len(loader) == 4
        keys.append({k for b in batches for k in b.keys})
    assert keys[0].isdisjoint(keys[1])


def test_longer_epoch_cycles_and_stays_equal(dataset):
    counts = [len(_load(dataset, rank=r, world_size=2, samples_per_epoch=200)[1]) for r in range(2)]
    assert counts == [200 // 8, 200 // 8]


def test_deterministic_per_seed_and_epoch(dataset):
    _, first = _load(dataset, epoch=1)
    _, again = _load(dataset, epoch=1)
    _, other = _load(dataset, epoch=2)
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again))
    assert [b.keys for b in first] != [b.keys for b in other]


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_skip_batches_resumes_exactly(dataset, skip):
    full_loader, full = _load(dataset, rank=1, world_size=2, samples_per_epoch=72)
    resumed_loader, resumed = _load(dataset, rank=1, world_size=2, samples_per_epoch=72, skip=skip)
    assert len(resumed_loader) == len(full_loader) == 9  # odd: workers end unevenly
    assert len(resumed) == len(full) - skip
    for a, b in zip(full[skip:], resumed):
        assert a.keys == b.keys
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert resumed_loader.position == len(full_loader)


def test_bad_sample_skipped_and_counted(tmp_path):
    bad = "s0001i00002"
    root = make_dataset(tmp_path / "ds", [6, 6], num_classes=4, image_size=24, bad_keys=[bad])
    # evaluation mode: every good sample exactly once, the bad one dropped and reported
    loader, batches = _load(root, num_workers=2, shuffle=False, drop_last=False, batch_size_per_rank=5,
                            transform=create_eval_transform(16))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(f"s{s:04d}i{i:05d}" for s in range(2) for i in range(6) if (s, i) != (1, 2))
    assert loader.num_bad_samples == 1 and loader.bad_keys == [bad]
    assert len(batches) == len(loader)
    # training mode: the batch stays full (a good sample stands in), the bad one is still counted
    loader, batches = _load(root, num_workers=0, batch_size_per_rank=12, shuffle_buffer=1)
    assert loader.num_bad_samples == 1 and batches[0].bad_keys == (bad,)
    assert batches[0].images.shape[0] == 12 and bad not in batches[0].keys


def test_too_many_bad_samples_fail_loudly(tmp_path):
    bad = [f"s0000i{i:05d}" for i in range(60)]
    root = make_dataset(tmp_path / "ds", [120], num_classes=2, image_size=16, bad_keys=bad)
    loader = create_loader(root, "train", batch_size_per_rank=40, num_workers=0, shuffle=False,
                           max_bad_fraction=0.1, transform=create_eval_transform(16))
    with pytest.raises(ds.DatasetError, match="max_bad_fraction"):
        list(loader)


def test_memory_dataset(dataset):
    root = make_dataset("memory://reader-test/ds", [5, 4, 6], num_classes=3, image_size=24)
    loader, batches = _load(root, num_workers=2, batch_size_per_rank=3)
    assert len(batches) == len(loader) == 5
    fs = fsspec.filesystem("memory")
    shard_bytes = sum(fs.size(path) for path in fs.glob("/reader-test/ds/shards/train-*.tar"))
    assert shard_bytes > 0
    assert dataset_info(root)["splits"]["train"] == {"num_shards": 3, "num_samples": 15, "bytes": shard_bytes}
    assert num_classes(root) == 3


def test_timm_reads_dataset(dataset):
    from timm.data import create_dataset

    timm_ds = create_dataset("wds/testset", root=dataset, split="train")
    samples = list(timm_ds)
    assert len(samples) == sum(SHARD_SIZES)
    image, target = samples[0]
    assert isinstance(image, Image.Image) and image.size == (40, 32)
    assert sorted({t for _, t in samples}) == [0, 1, 2, 3, 4]


def test_plain_tarfile_reads_shard(dataset):
    url = ds.split_shards(dataset, "train")[0][0]
    with tarfile.open(url) as tar:
        names = tar.getnames()
        assert names[:3] == ["s0000i00000.cls", "s0000i00000.jpg", "s0000i00000.json"]
        assert tar.extractfile("s0000i00000.cls").read() == b"0"
        Image.open(io.BytesIO(tar.extractfile("s0000i00000.jpg").read())).verify()
    assert len(names) == 3 * SHARD_SIZES[0]


def test_eval_mode_reads_every_sample_once(dataset):
    loader, batches = _load(dataset, num_workers=2, shuffle=False, drop_last=False, batch_size_per_rank=5,
                            transform=create_eval_transform(16))
    keys = collections.Counter(k for b in batches for k in b.keys)
    assert sum(keys.values()) == 36 and set(keys.values()) == {1}
    assert len(loader) == len(batches)


def test_transforms_shapes_and_draft_decode():
    jpg = noise_jpeg(0, 640, 480)
    train = create_train_transform(64)
    out = train.from_bytes(jpg, rng=random.Random(0))
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert torch.equal(out, train.from_bytes(jpg, rng=random.Random(0)))  # reproducible from the rng
    # the draft decode stays close to a full decode of the same crop (same box, same flip)
    plain = create_train_transform(64, use_draft=False).from_bytes(jpg, rng=random.Random(0))
    assert (out.float() - plain.float()).abs().mean() < 12
    evaluated = create_eval_transform(64).from_bytes(jpg)
    assert evaluated.shape == (3, 64, 64)
    assert create_eval_transform(64)(Image.open(io.BytesIO(jpg))).shape == (3, 64, 64)


def test_normalize():
    mean_pixel = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    x = normalize(mean_pixel.expand(2, 3, 4, 4), IMAGENET_MEAN, IMAGENET_STD)
    assert x.dtype == torch.float32 and x.abs().max() < 0.01
    white = normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(white[:, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))


def test_iterating_again_replays_the_epoch(dataset):
    loader = create_loader(dataset, "train", batch_size_per_rank=6, num_workers=0, seed=1,
                           transform=create_train_transform(16), shuffle_buffer=4)
    first, second = [b.keys for b in loader], [b.keys for b in loader]
    assert first == second and len(first) == len(loader) == 6
    loader.set_epoch(1)
    assert [b.keys for b in loader] != first and loader.position == len(loader)


@pytest.mark.parametrize("num_workers, batch, skip", [(2, 5, 3), (3, 4, 0), (0, 4, 2)])
def test_epochs_back_to_back_match_one_loader_per_epoch(dataset, num_workers, batch, skip):
    """num_epochs > 1 keeps one set of workers for all epochs and yields exactly what one loader per
    epoch would (same keys, same augmented pixels), also when resuming mid-epoch."""
    per_epoch = []
    for epoch in range(1, 4):
        _, batches = _load(dataset, num_workers=num_workers, epoch=epoch, skip=skip if epoch == 1 else 0,
                           batch_size_per_rank=batch)
        per_epoch.extend(batches)
    loader, joined = _load(dataset, num_workers=num_workers, epoch=1, skip=skip, batch_size_per_rank=batch,
                           num_epochs=3)
    assert len(loader) == 3 * (36 // batch) and len(joined) == len(loader) - skip
    assert [b.keys for b in joined] == [b.keys for b in per_epoch]
    assert all(torch.equal(a.images, b.images) for a, b in zip(joined, per_epoch))

