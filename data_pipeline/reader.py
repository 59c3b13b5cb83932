"""The dataset reader: a dataset URL (contract 1) in, equal-length streams of uint8 batches out.

    loader = create_loader("s3://bucket/ds", "train", batch_size_per_rank=256, rank=r, world_size=n,
                           num_workers=8, seed=0, epoch=e, transform=create_train_transform(224),
                           skip_batches=k)
    for batch in loader:              # Batch(images uint8 [B,3,H,W], labels int64 [B], keys, bad_keys)
        x = normalize(batch.images.to(device), IMAGENET_MEAN, IMAGENET_STD)

How an epoch is laid out (everything is a pure function of the manifest and the arguments; no tar
is opened to plan it):

* The split's shards are cut into *pieces*. With at least as many shards as loader slots
  (world_size x num_workers) a piece is a whole shard; with fewer, each shard is strided into
  ceil(slots / shards) pieces (sample i of the shard goes to piece i % parts), so every slot gets data.
* Pieces are dealt largest first to the least-loaded slot (slot loads end within one piece of each
  other whatever the shard sizes); ties, the slot-to-rank mapping and each slot's piece order are
  shuffled from (seed, epoch).
* Each slot streams its pieces (cycling them, reshuffled, when its quota exceeds its data) through
  a seeded shuffle buffer and is cut at an exact sample count: rank batches = samples_per_epoch //
  (world_size x batch_size_per_rank), dealt to the rank's loader workers round robin. So every rank
  yields exactly `len(loader)` full batches whatever the shard sizes: no DDP hang at epoch end.
* Batches are assembled inside the worker (DataLoader batch_size=None), so the DataLoader's round
  robin over workers fixes the batch order. Rank batch i comes from worker i % num_workers.
* Decode + transform run after the shuffle buffer and after batching, so `skip_batches=k` (exact
  resume) only reads and shuffles the skipped samples, never decodes them. Augmentation draws from a
  `random.Random` seeded by (seed, epoch, rank, batch index), so a resumed epoch is bit-identical.
* A bad sample (undecodable image, missing field, label out of range) is counted and reported in
  `Batch.bad_keys` / `Loader.num_bad_samples`. In training mode (drop_last) its place in the batch is
  taken by a copy of a good sample of the same batch, so batch boundaries (and resume) stay exact;
  in exactly-once mode (drop_last=False) it is dropped and the batch is shorter.

Determinism holds for a fixed (dataset, split, world_size, num_workers, batch_size_per_rank,
samples_per_epoch, seed, epoch, shuffle_buffer). Loader workers live as long as one iteration of the
loader: one epoch, or `num_epochs` epochs back to back (fine-tuning on small data, where a worker
restart per epoch would cost more than the epoch), with the allocator settings (`data_pipeline.ALLOCATOR_ENV`) applied
(`_init_worker`). `memory://`
datasets need the default fork start method (the store is per process).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import fsspec
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import ALLOCATOR_ENV, apply_allocator_settings
from data_pipeline import dataset as ds
from data_pipeline.transforms import create_eval_transform, decode_and_transform

log = logging.getLogger(__name__)

_BAD_SAMPLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, Image.DecompressionBombError)


class Batch(NamedTuple):
    images: torch.Tensor          # uint8 [B, 3, H, W]
    labels: torch.Tensor          # int64 [B]
    keys: list[str]               # sample keys, in batch order (a replaced bad sample shows its stand-in's key)
    bad_keys: tuple[str, ...] = ()  # keys of samples skipped while building this batch
    targets: tuple = ()           # with a `decoder` (detection): its per-sample targets; labels are then -1


@dataclass(frozen=True)
class Piece:
    """Samples i of one shard with i % num_parts == part."""
    url: str
    shard_samples: int
    part: int = 0
    num_parts: int = 1

    @property
    def num_samples(self) -> int:
        return self.shard_samples // self.num_parts + (1 if self.part < self.shard_samples % self.num_parts else 0)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def plan_slots(shards: list[tuple[str, int]], num_slots: int, *, seed: int, epoch: int,
               shuffle: bool) -> list[list[Piece]]:
    """Deal the split's shards (as pieces) to `num_slots` loader slots; deterministic in (seed, epoch)."""
    if not shards:
        raise ds.DatasetError("split has no shards")
    parts = 1 if len(shards) >= num_slots else math.ceil(num_slots / len(shards))
    pieces = [Piece(url, n, p, parts) for url, n in shards for p in range(parts)]
    pieces = [p for p in pieces if p.num_samples > 0]
    if not pieces:
        raise ds.DatasetError("split has no samples")
    rng = _rng(seed, epoch, "plan") if shuffle else None
    if rng is not None:
        rng.shuffle(pieces)  # random order among equal sizes (the usual case: full shards)
    # largest piece first to the least-loaded slot: slot loads end within one piece of each other
    pieces.sort(key=lambda p: -p.num_samples)
    slots: list[list[Piece]] = [[] for _ in range(num_slots)]
    heap = [(0, slot) for slot in range(num_slots)]  # (samples so far, slot)
    for piece in pieces:
        load, slot = heapq.heappop(heap)
        slots[slot].append(piece)
        heapq.heappush(heap, (load + piece.num_samples, slot))
    for slot, assigned in enumerate(slots):
        if not assigned:  # fewer samples than slots: share pieces rather than leave a slot without data
            assigned.append(pieces[slot % len(pieces)])
    if rng is not None:
        rng.shuffle(slots)  # which rank/worker reads which shards changes every epoch
        for assigned in slots:
            rng.shuffle(assigned)
    return slots


def _iter_pass(pieces: list[Piece], stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Raw samples of `pieces`, in order, once."""
    for piece in pieces:
        try:
            for index, sample in enumerate(ds.iter_shard(piece.url)):
                if index % piece.num_parts == piece.part:
                    yield sample
        except (OSError, EOFError, tarfile.TarError) as exc:
            # a corrupt or vanished shard costs its remaining samples, not the run; the slot's quota
            # is still met by cycling. `megaclass ingest --verify` finds such shards up front.
            stats["bad_shards"] += 1
            log.warning("shard %s unreadable, moving on: %s", piece.url, exc)


def _slot_samples(pieces: list[Piece], *, cycle: bool, shuffle: bool, shuffle_buffer: int,
                  seed_parts: tuple, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """One slot's raw sample stream: pass after pass over its pieces (one pass unless `cycle`).

    Each pass goes through its own seeded shuffle buffer, so every sample of the slot is used once
    before any is repeated; later passes also reshuffle the piece order.
    """
    for pass_index in itertools.count():
        order = list(pieces)
        if shuffle and pass_index > 0:
            _rng(*seed_parts, pass_index, "pieces").shuffle(order)
        samples = _iter_pass(order, stats)
        if shuffle and shuffle_buffer > 1:
            import webdataset as wds  # its seeded buffer shuffle; imported here to keep import time low
            samples = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=_rng(*seed_parts, pass_index, "buffer"))(samples)
        produced = 0
        for sample in samples:
            produced += 1
            yield sample
        if not cycle:
            return
        if produced == 0:
            raise ds.DatasetError(f"no readable samples in {len(pieces)} shard piece(s), e.g. {pieces[0].url}")


def _worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    return [num_batches // num_workers + (1 if w < num_batches % num_workers else 0) for w in range(num_workers)]


class ShardStream(IterableDataset):
    """One rank's slots as an IterableDataset of `Batch`es (used by `Loader`; picklable for workers)."""

    def __init__(self, shards: list[tuple[str, int]], *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, epoch: int, transform: Callable, shuffle_buffer: int,
                 batches_per_rank: int | None, skip_batches: int, shuffle: bool, num_classes: int | None,
                 num_epochs: int = 1, decoder: Callable | None = None):
        super().__init__()
        self.decoder = decoder
        self.shards = shards
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.epoch = epoch
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_rank = batches_per_rank  # None: every sample once, last batch per worker short
        self.skip_batches = skip_batches
        self.shuffle = shuffle
        self.num_classes = num_classes
        self.num_epochs = num_epochs  # > 1 (training only): epochs epoch..epoch+num_epochs-1 in one pass

    def slot_pieces(self, epoch: int | None = None) -> list[list[Piece]]:
        """Pieces of this rank's logical workers in `epoch` (default: the first), index = logical worker."""
        slots = plan_slots(self.shards, self.world_size * self.num_workers, seed=self.seed,
                           epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle)
        return slots[self.rank * self.num_workers:(self.rank + 1) * self.num_workers]

    def num_batches(self) -> int:
        if self.batches_per_rank is not None:
            return self.batches_per_rank
        return sum(math.ceil(sum(p.num_samples for p in pieces) / self.batch_size) for pieces in self.slot_pieces())

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers, DataLoader has {info.num_workers}")
        if self.num_epochs == 1:
            return self._iter_epoch(self.epoch, self.skip_batches, loader_worker)
        return self._iter_epochs(loader_worker)

    def _iter_epochs(self, loader_worker: int) -> Iterator[Batch]:
        """Several epochs through the same workers: the DataLoader asks its workers round robin, so
        worker j yields the rank's batches g with (g - first) % W == j, g counted over all epochs."""
        batches_per_epoch = self.num_batches()
        W = self.num_workers
        for offset in range(self.num_epochs):
            skip = self.skip_batches if offset == 0 else 0
            # batches of earlier epochs this stream yields before epoch `offset` begins
            before = 0 if offset == 0 else offset * batches_per_epoch - self.skip_batches
            yield from self._iter_epoch(self.epoch + offset, skip, (loader_worker - before) % W)

    def _iter_epoch(self, epoch: int, skip_batches: int, loader_worker: int) -> Iterator[Batch]:
        # Rotate roles so that after skipping k batches DataLoader worker 0 (which the DataLoader asks
        # first) holds rank batch k: worker j plays logical worker (k + j) % W.
        logical = (skip_batches + loader_worker) % self.num_workers
        return self._iter_logical(logical, epoch, skip_batches)

    def _iter_logical(self, logical: int, epoch: int, skip_batches: int) -> Iterator[Batch]:
        W, B = self.num_workers, self.batch_size
        pieces = self.slot_pieces(epoch)[logical]
        slot = self.rank * W + logical
        stats = {"bad_shards": 0}
        train_mode = self.batches_per_rank is not None
        raw = _slot_samples(pieces, cycle=train_mode, shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                            seed_parts=(self.seed, epoch, slot), stats=stats)
        raw = iter(raw)
        if train_mode:
            num_local = _worker_batch_counts(self.batches_per_rank, W)[logical]
            windows: Iterator[list] = (list(itertools.islice(raw, B)) for _ in range(num_local))
        else:
            windows = iter(lambda: list(itertools.islice(raw, B)), [])
        skip_local = max(0, -(-(skip_batches - logical) // W))
        for local_index, window in enumerate(windows):
            if local_index < skip_local:
                continue
            batch_index = local_index * W + logical  # index of this batch within the rank's epoch
            yield self._build_batch(window, raw, _rng(self.seed, epoch, self.rank, batch_index, "aug"),
                                    replace_bad=train_mode)

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, Any]:
        if self.decoder is not None:
            return self.decoder(sample, rng)
        label = int(sample["cls"])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        return decode_and_transform(sample["jpg"], self.transform, rng=rng), label

    def _build_batch(self, window: list[dict], raw: Iterator[dict], rng: random.Random,
                     replace_bad: bool) -> Batch:
        good: list[tuple[torch.Tensor, Any, str]] = []
        bad: list[str] = []
        positions = []  # per window position: index into `good`, or None for a bad sample
        pending = list(window)
        while pending:
            sample = pending.pop(0)
            key = str(sample.get("__key__", "?"))
            try:
                image, label = self._decode(sample, rng)
            except _BAD_SAMPLE_ERRORS as exc:
                log.debug("bad sample %s: %s", key, exc)
                bad.append(key)
                positions.append(None)
                if replace_bad and not pending and not good:
                    # the whole window was bad: draw more (only case where resume can drift by a few samples)
                    pending.append(next(raw))
                continue
            positions.append(len(good))
            good.append((image, label, key))
        if replace_bad:
            # keep the batch full: bad positions take copies of the good samples, in order
            stand_ins = itertools.cycle(range(len(good)))
            order = [p if p is not None else next(stand_ins) for p in positions][: self.batch_size]
        else:
            order = [p for p in positions if p is not None]
        if not order:  # evaluation mode, every sample of the window bad: an empty batch keeps the count
            size = int(getattr(self.decoder or self.transform, "image_size", 0))
            return Batch(torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [],
                         tuple(bad))
        if self.decoder is not None:
            return Batch(torch.stack([good[i][0] for i in order]), torch.full((len(order),), -1, dtype=torch.int64),
                         [good[i][2] for i in order], tuple(bad), tuple(good[i][1] for i in order))
        return Batch(torch.stack([good[i][0] for i in order]),
                     torch.tensor([good[i][1] for i in order], dtype=torch.int64),
                     [good[i][2] for i in order], tuple(bad))


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's collate step: batches are already built (its default would turn tuples into lists)."""
    return batch


def _init_worker(worker_id: int) -> None:
    """Loader worker start: the allocator settings (`ALLOCATOR_ENV`) applied in the forked worker."""
    apply_allocator_settings()


class Loader:
    """Iterable over one rank's batches of one epoch; see the module doc for the layout.

    `len(loader)`: batches of the whole epoch on this rank (identical on every rank in training mode).
    Iterating after `skip_batches=k` yields batches k..len-1. `position` is the index of the next
    batch (pass it as `skip_batches` to resume). `num_bad_samples` / `bad_keys` count bad samples seen.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool,
                 max_bad_fraction: float | None):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.max_bad_fraction = max_bad_fraction
        self.num_bad_samples = 0
        self.num_samples_seen = 0
        self.bad_keys: list[str] = []  # first 1000, for the run log
        self.position = stream.skip_batches
        self._len = stream.num_batches() * stream.num_epochs

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Re-plan for another epoch (training-mode batch count is unchanged)."""
        self.stream.epoch = epoch
        self.stream.skip_batches = skip_batches
        self.position = skip_batches
        self._len = self.stream.num_batches() * self.stream.num_epochs

    def _dataloader(self) -> DataLoader:
        for name, value in ALLOCATOR_ENV.items():  # inherited by spawned workers
            os.environ.setdefault(name, value)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(worker_init_fn=_init_worker, prefetch_factor=2, persistent_workers=False)
        return DataLoader(self.stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, **kwargs)

    def __iter__(self) -> Iterator[Batch]:
        # every iteration replays the epoch from `skip_batches` (a second pass is the same epoch again)
        self.position = self.stream.skip_batches
        if self.position >= self._len:
            return
        for batch in self._dataloader():
            self.position += 1
            self.num_samples_seen += len(batch.keys) + (0 if self.stream.batches_per_rank else len(batch.bad_keys))
            if batch.bad_keys:
                self.num_bad_samples += len(batch.bad_keys)
                self.bad_keys.extend(batch.bad_keys[: max(0, 1000 - len(self.bad_keys))])
                self._check_bad_fraction()
            yield batch

    def _check_bad_fraction(self) -> None:
        if self.max_bad_fraction is None or self.num_samples_seen < 100:
            return
        fraction = self.num_bad_samples / self.num_samples_seen
        if fraction > self.max_bad_fraction:
            raise ds.DatasetError(f"{self.num_bad_samples} bad samples of {self.num_samples_seen} read "
                                  f"({fraction:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                                  f"first: {', '.join(self.bad_keys[:5])}")


def num_classes(dataset_url: str) -> int:
    """Number of classes (rows of classes.parquet; ids are dense 0..C-1)."""
    url = ds.join(dataset_url, ds.CLASSES_FILE)
    if not ds.exists(url):
        raise ds.DatasetError(f"{dataset_url}: no {ds.CLASSES_FILE}")
    with fsspec.open(url, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def dataset_info(dataset_url: str) -> dict[str, Any]:
    """Manifest summary: format version, manifest sha256, classes, and per split shards and samples."""
    manifest = ds.read_manifest(dataset_url)
    splits = {
        name: {"num_shards": len(entry["shards"]),
               "num_samples": sum(int(s["num_samples"]) for s in entry["shards"]),
               "bytes": sum(int(s.get("bytes", 0)) for s in entry["shards"])}
        for name, entry in manifest.get("splits", {}).items()
    }
    return {"url": dataset_url, "format_version": manifest["format_version"],
            "manifest_sha256": ds.manifest_sha256(dataset_url), "num_classes": num_classes(dataset_url),
            "splits": splits}


def create_loader(dataset_url: str, split: str, *, batch_size_per_rank: int, rank: int = 0,
                  world_size: int = 1, num_workers: int = 2, seed: int = 0, epoch: int = 0,
                  transform: Callable | None = None, shuffle_buffer: int = 1000,
                  samples_per_epoch: int | None = None, skip_batches: int = 0, shuffle: bool = True,
                  drop_last: bool = True, pin_memory: bool = False,
                  max_bad_fraction: float | None = None, classes: int | None = None, num_epochs: int = 1,
                  decoder: Callable | None = None) -> Loader:
    """One rank's loader for one epoch of `split` (see the module doc for the guarantees).

    drop_last=True (training): every rank yields exactly len(loader) = samples_per_epoch //
    (world_size * batch_size_per_rank) full batches; samples_per_epoch defaults to the split size.
    drop_last=False (evaluation): every sample of the rank's slots exactly once, each worker's last
    batch may be short; with world_size=1 that is every sample of the split.
    transform: a callable on PIL images returning uint8 CHW (ours also decode from bytes with draft);
    default: eval transform at 224. classes: label bound for validation (default: classes.parquet).
    num_epochs > 1 (training): epochs epoch..epoch+num_epochs-1 back to back through the same loader
    workers (no restart between epochs), batch for batch identical to one loader per epoch;
    len(loader) = num_epochs x batches per epoch and skip_batches counts within the first epoch.
    decoder: replaces label decoding + transform: (sample dict, rng) -> (uint8 CHW, target), for samples
    whose target is more than a class id (detection: `data_pipeline.detection.DetectionDecoder`).
    """
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    if num_epochs < 1 or (num_epochs > 1 and not drop_last):
        raise ValueError(f"num_epochs must be >= 1, and 1 unless drop_last (training), got {num_epochs}")
    shards = ds.split_shards(dataset_url, split)
    total = sum(n for _, n in shards)
    if drop_last:
        samples = total if samples_per_epoch is None else int(samples_per_epoch)
        batches_per_rank = samples // (world_size * batch_size_per_rank)
        if batches_per_rank < 1:
            raise ds.DatasetError(f"{dataset_url} split {split!r}: {samples} samples per epoch give no full batch "
                                  f"of {batch_size_per_rank} on each of {world_size} rank(s)")
    else:
        if samples_per_epoch is not None:
            raise ValueError("samples_per_epoch applies to drop_last=True (training) only")
        batches_per_rank = None
    if classes is None and ds.exists(ds.join(dataset_url, ds.CLASSES_FILE)):
        classes = num_classes(dataset_url)
    stream = ShardStream(shards, batch_size=batch_size_per_rank, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, epoch=epoch,
                         transform=transform or create_eval_transform(224), shuffle_buffer=shuffle_buffer,
                         batches_per_rank=batches_per_rank, skip_batches=skip_batches, shuffle=shuffle,
                         num_classes=classes, num_epochs=num_epochs, decoder=decoder)
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory, max_bad_fraction=max_bad_fraction)
