"""Memory and step time of the sharded classifier head per rank, at world size 1 and 2.

    .venv/bin/python bench/head.py                       # C = 1k, 10k, 100k; F = 2048; batch 32/rank
    .venv/bin/python bench/head.py --classes 1000 --steps 3 --json out.json

Each (C, world) runs in fresh processes (gloo on CPU, one thread per rank, as if each rank had its
own core) so RSS is measured cleanly. A step is forward (all-gather features, local logits, cross-rank
cross-entropy) + backward + fused AdamW. "state" is parameters + gradients + AdamW moments held
by one rank; "rss" is the growth of the process's peak RSS over its RSS before the head was built.
Target (docs/design.md, "Scale, on paper"): memory per rank at world 2 about half of world 1. The batch is fixed per rank,
so the global batch doubles with the world: each rank scores 2x the samples against 1/2 the
classes (same matmul work per rank, twice the samples per second), while the optimizer step
halves. bench/train.py part (c) calls run_head_bench().
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

# The allocator settings (data_pipeline.ALLOCATOR_ENV); spawned ranks inherit them (glibc reads them at start).
from data_pipeline import ALLOCATOR_ENV  # noqa: E402  (imports nothing)

for _key, _value in ALLOCATOR_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pretrain.dist import DistInfo, all_reduce_max, cleanup, init_distributed  # noqa: E402
from pretrain.head import ShardedClassifierHead  # noqa: E402

MB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up_libraries(dist: DistInfo, num_features: int, batch_per_rank: int) -> None:
    """One step of a tiny head first, so one-time allocations (kernels, gloo buffers, autograd)
    are not counted as head memory."""
    head = ShardedClassifierHead(num_features, dist.world_size, dist, init_seed=0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, fused=True)
    features = torch.randn(batch_per_rank, num_features, requires_grad=True)
    head.forward_loss(features, torch.zeros(batch_per_rank, dtype=torch.long)).loss.backward()
    optimizer.step()


def _measure(dist: DistInfo, num_classes: int, num_features: int, batch_per_rank: int,
             warmup_steps: int, steps: int, keep_grads: bool = False) -> dict:
    torch.manual_seed(dist.rank)
    _warm_up_libraries(dist, num_features, batch_per_rank)
    rss_before = _rss_bytes()
    head = ShardedClassifierHead(num_features, num_classes, dist, init_seed=0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, fused=True)
    features = torch.randn(batch_per_rank, num_features, requires_grad=True)
    targets = torch.randint(num_classes, (batch_per_rank,))
    fwd_bwd_s, step_s = [], []
    for step in range(warmup_steps + steps):
        t0 = time.perf_counter()
        loss = head.forward_loss(features, targets, label_smoothing=0.1).loss
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        # keep_grads saves re-faulting fresh gradient pages each step, but backward then adds a new
        # weight-sized gradient into the kept one: a transient that raises the peak by one weight.
        optimizer.zero_grad(set_to_none=not keep_grads)
        features.grad = None
        t2 = time.perf_counter()
        if step >= warmup_steps:
            fwd_bwd_s.append(t1 - t0)
            step_s.append(t2 - t0)
    # gradients are as large as their parameters (they may be freed right now: keep_grads=False)
    tensors = list(head.parameters()) * 2
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "num_classes": num_classes, "world_size": dist.world_size, "rank": dist.rank,
        "rows_per_rank": head.end - head.start, "state_bytes": state_bytes,
        "rss_bytes": peak_rss - rss_before, "loss": loss.item(),
        "global_batch": batch_per_rank * dist.world_size,
        # the slowest rank sets the pace of a synchronous step
        "fwd_bwd_ms": all_reduce_max(statistics.median(fwd_bwd_s) * 1e3, dist),
        "step_ms": all_reduce_max(statistics.median(step_s) * 1e3, dist),
    }


def _worker(rank: int, world_size: int, port: int, out_dir: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist = init_distributed("gloo", use_gpu=False)
    else:
        dist = DistInfo()
    result = _measure(dist, **kwargs)
    cleanup(dist)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_head_bench(classes=(1000, 10_000, 100_000), worlds=(1, 2), *, num_features: int = 2048,
                   batch_per_rank: int = 32, warmup_steps: int = 2, steps: int = 5,
                   keep_grads: bool = False) -> list[dict]:
    """One row per (C, world): rank 0's figures (state and rss are per rank, times the slowest)."""
    rows = []
    for num_classes in classes:
        for world_size in worlds:
            kwargs = dict(num_classes=num_classes, num_features=num_features,
                          batch_per_rank=batch_per_rank, warmup_steps=warmup_steps, steps=steps,
                          keep_grads=keep_grads)
            with tempfile.TemporaryDirectory() as out_dir:
                mp.spawn(_worker, args=(world_size, _free_port(), out_dir, kwargs), nprocs=world_size)
                per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world_size)]
            row = dict(per_rank[0])
            row["rss_bytes_max"] = max(r["rss_bytes"] for r in per_rank)
            row["state_bytes_max"] = max(r["state_bytes"] for r in per_rank)
            rows.append(row)
    return rows


def _samples_per_s(row: dict) -> float:
    return row["global_batch"] / (row["step_ms"] / 1e3)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'classes':>8} {'world':>5} {'rows/rank':>9} {'state MB/rank':>13} {'rss MB/rank':>11} "
             f"{'fwd+bwd ms':>10} {'step ms':>8} {'samples/s':>9}"]
    for r in rows:
        lines.append(f"{r['num_classes']:>8} {r['world_size']:>5} {r['rows_per_rank']:>9} "
                     f"{r['state_bytes_max'] / MB:>13.1f} {r['rss_bytes_max'] / MB:>11.1f} "
                     f"{r['fwd_bwd_ms']:>10.1f} {r['step_ms']:>8.1f} {_samples_per_s(r):>9.0f}")
    by_key = {(r["num_classes"], r["world_size"]): r for r in rows}
    for num_classes in sorted({r["num_classes"] for r in rows}):
        one, two = by_key.get((num_classes, 1)), by_key.get((num_classes, 2))
        if one and two:
            lines.append(f"C={num_classes}: world2/world1 state {two['state_bytes_max'] / one['state_bytes_max']:.3f}"
                         f"  rss {two['rss_bytes_max'] / one['rss_bytes_max']:.3f}"
                         f"  time per sample {_samples_per_s(one) / _samples_per_s(two):.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-features", type=int, default=2048)
    parser.add_argument("--batch-per-rank", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep-grads", action="store_true",
                        help="zero_grad(set_to_none=False) instead of freeing gradients each step")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_head_bench(args.classes, args.worlds, num_features=args.num_features,
                          batch_per_rank=args.batch_per_rank, warmup_steps=args.warmup_steps, steps=args.steps,
                          keep_grads=args.keep_grads)
    print(f"sharded head: F={args.num_features}, batch {args.batch_per_rank}/rank, fp32, fused AdamW, "
          f"gloo on CPU, 1 thread per rank, keep_grads={args.keep_grads}, torch {torch.__version__}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
