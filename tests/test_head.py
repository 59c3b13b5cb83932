"""The sharded head on 2 real gloo ranks equals nn.Linear + F.cross_entropy on the global batch.

One spawn of two CPU processes runs every case (process start and gloo setup dominate the cost);
each case records its largest deviation from the dense single-process reference, and the tests
below assert on those numbers.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.dist import DistInfo, all_gather_with_grad, cleanup, init_distributed
from tests.conftest import free_port
from pretrain.head import (ShardedClassifierHead, clip_grad_norm_, gather_rows, sharded_cross_entropy,
                           sharded_topk_correct)

WORLD = 2
TOL = 1e-5
NUM_FEATURES = 8
BATCH_PER_RANK = 4
# (name, num_classes, label_smoothing, mixup: None | "scalar" | "per_sample", use forward_loss)
GRAD_CASES = [
    ("plain", 16, 0.0, None, True),
    ("smoothing", 16, 0.1, None, False),
    ("mixup_scalar", 16, 0.1, "scalar", True),
    ("mixup_per_sample", 10, 0.0, "per_sample", True),
    ("classes_7", 7, 0.1, None, True),
    ("classes_3", 3, 0.0, "scalar", False),
    ("classes_1", 1, 0.1, None, True),
]


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(5, NUM_FEATURES), nn.Tanh(), nn.Linear(NUM_FEATURES, NUM_FEATURES))


def _dense_loss(logits, y, eps, y_b, lam):
    if y_b is None:
        return F.cross_entropy(logits, y, label_smoothing=eps)
    per_sample = (lam * F.cross_entropy(logits, y, label_smoothing=eps, reduction="none")
                  + (1 - lam) * F.cross_entropy(logits, y_b, label_smoothing=eps, reduction="none"))
    return per_sample.mean()


def _grad_case(dist: DistInfo, seed: int, num_classes: int, eps: float, mixup, use_forward_loss: bool):
    torch.manual_seed(seed)  # same draws on every rank: the global batch and the dense reference
    batch = WORLD * BATCH_PER_RANK
    x = torch.randn(batch, 5)
    y = torch.randint(num_classes, (batch,))
    y_b = torch.randint(num_classes, (batch,)) if mixup else None
    lam = {None: 1.0, "scalar": 0.7, "per_sample": torch.rand(batch)}[mixup]
    backbone_ref, linear_ref = _backbone(), nn.Linear(NUM_FEATURES, num_classes)
    loss_ref = _dense_loss(linear_ref(backbone_ref(x)), y, eps, y_b, lam)
    loss_ref.backward()

    backbone = _backbone()
    backbone.load_state_dict(backbone_ref.state_dict())
    ddp = DistributedDataParallel(backbone)
    head = ShardedClassifierHead(NUM_FEATURES, num_classes, dist)
    head.load_full_state(linear_ref.state_dict())
    rows = slice(dist.rank * BATCH_PER_RANK, (dist.rank + 1) * BATCH_PER_RANK)
    features = ddp(x[rows])
    if use_forward_loss:
        local_lam = lam[rows] if isinstance(lam, torch.Tensor) else lam
        loss = head.forward_loss(features, y[rows], label_smoothing=eps,
                                 targets_b_local=None if y_b is None else y_b[rows], lam=local_lam).loss
    else:
        loss = sharded_cross_entropy(head(features), y, dist, class_start=head.start,
                                     label_smoothing=eps, targets_b=y_b, lam=lam)
    loss.backward()
    errors = [abs(loss.item() - loss_ref.item()),
              (gather_rows(head.weight.grad, num_classes, dist) - linear_ref.weight.grad).abs().max().item(),
              (gather_rows(head.bias.grad, num_classes, dist) - linear_ref.bias.grad).abs().max().item()]
    errors += [(p.grad - p_ref.grad).abs().max().item()
               for p, p_ref in zip(backbone.parameters(), backbone_ref.parameters())]
    norm = clip_grad_norm_(backbone.parameters(), head.parameters(), 0.5, dist)
    norm_ref = nn.utils.clip_grad_norm_([*backbone_ref.parameters(), *linear_ref.parameters()], 0.5)
    errors += [abs(norm.item() - norm_ref.item()),
               (gather_rows(head.weight.grad, num_classes, dist) - linear_ref.weight.grad).abs().max().item()]
    errors += [(head.full_state()["weight"] - linear_ref.weight).abs().max().item()]
    return max(errors)


def _gather_case(dist: DistInfo):
    x = torch.full((3, 2), float(dist.rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x, dist)
    weights = torch.arange(12.0).view(6, 2) * (dist.rank + 1)  # a different loss on each rank
    (gathered * weights).sum().backward()
    expected = (torch.arange(12.0).view(6, 2) * 3)[dist.rank * 3:(dist.rank + 1) * 3]
    return {"forward_ok": bool(gathered[:3].eq(1).all() and gathered[3:].eq(2).all()),
            "grad_error": (x.grad - expected).abs().max().item()}


def _topk_case(dist: DistInfo, num_classes: int):
    torch.manual_seed(3)
    logits, y = torch.randn(8, num_classes), torch.randint(num_classes, (8,))
    dense_top = logits.topk(min(5, num_classes), dim=1).indices
    dense = {k: int((dense_top[:, :k] == y[:, None]).any(1).sum()) for k in (1, 5)}
    head = ShardedClassifierHead(1, num_classes, dist)
    local = logits[:, head.start:head.end]
    ok = sharded_topk_correct(local, y, dist, head.start, ks=(1, 5)) == dense
    return ok


def _state_case(dist: DistInfo):
    head = ShardedClassifierHead(6, 7, dist, init_seed=11)
    single = ShardedClassifierHead(6, 7, DistInfo(), init_seed=11)  # world 1, same seed
    full = head.full_state()
    same_init = torch.equal(full["weight"], single.weight) and torch.equal(full["bias"], single.bias)
    resharded = ShardedClassifierHead(6, 7, DistInfo(), init_seed=0)
    resharded.load_full_state(full)  # 2 -> 1
    back = ShardedClassifierHead(6, 7, dist, init_seed=5)
    back.load_full_state({k: v * 2 for k, v in resharded.state_dict().items()})  # 1 -> 2
    roundtrip = torch.equal(back.full_state()["weight"], full["weight"] * 2)
    sizes = (head.weight.shape[0], back.bias.shape[0])
    on_rank_0 = head.full_state(dst=0)  # the export path: only rank 0 receives the head
    to_rank_0 = (on_rank_0.keys() == full.keys() and all(torch.equal(on_rank_0[k], full[k]) for k in full)
                 if dist.rank == 0 else on_rank_0 == {})
    return (same_init and torch.equal(resharded.weight, single.weight) and roundtrip and to_rank_0
            and sizes == ((4, 4), (3, 3))[dist.rank])


def _sampled_case(dist: DistInfo):
    """sample_ratio 0.5: loss equals dense CE restricted to the union of sampled classes."""
    torch.manual_seed(4)
    num_classes, batch = 40, WORLD * BATCH_PER_RANK
    feats, y = torch.randn(batch, NUM_FEATURES), torch.randint(num_classes, (batch,))
    linear = nn.Linear(NUM_FEATURES, num_classes)
    head = ShardedClassifierHead(NUM_FEATURES, num_classes, dist, sample_ratio=0.5)
    head.load_full_state(linear.state_dict())
    rows = slice(dist.rank * BATCH_PER_RANK, (dist.rank + 1) * BATCH_PER_RANK)
    out = head.forward_loss(feats[rows], y[rows], label_smoothing=0.1)
    out.loss.backward()
    ids = [None] * WORLD
    torch_dist.all_gather_object(ids, out.class_ids.tolist())
    union = torch.tensor(sorted(sum(ids, [])))
    remap = torch.full((num_classes,), -1).index_put_((union,), torch.arange(len(union)))
    ref = F.cross_entropy(linear(feats)[:, union], remap[y], label_smoothing=0.1)
    unsampled = torch.ones(head.weight.shape[0], dtype=torch.bool)
    unsampled[out.class_ids - head.start] = False
    return max(abs(out.loss.item() - ref.item()),
               float(len(out.class_ids) < 10),  # ceil(0.5 * 20) at least
               float(not torch.isin(y, union).all()),
               head.weight.grad[unsampled].abs().max().item())


def _large_case(dist: DistInfo):
    """C = 120,000: each rank holds half the rows; loss equals the dense one and is finite."""
    num_classes, num_features = 120_000, 128
    head = ShardedClassifierHead(num_features, num_classes, dist, init_seed=1)
    torch.manual_seed(5)
    feats = torch.randn(WORLD * BATCH_PER_RANK, num_features)
    y = torch.randint(num_classes, (len(feats),))
    rows = slice(dist.rank * BATCH_PER_RANK, (dist.rank + 1) * BATCH_PER_RANK)
    loss = head.forward_loss(feats[rows], y[rows], label_smoothing=0.1).loss
    loss.backward()
    dense = ShardedClassifierHead(num_features, num_classes, DistInfo(), init_seed=1)
    ref = F.cross_entropy(dense(feats), y, label_smoothing=0.1)
    return {"loss_error": abs(loss.item() - ref.item()), "finite": bool(torch.isfinite(loss)),
            "rows": head.weight.shape[0], "grad_finite": bool(torch.isfinite(head.weight.grad).all())}


def _worker(rank: int, port: int, out_dir: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = init_distributed("gloo", use_gpu=False)
    results = {name: _grad_case(dist, seed, c, eps, mix, fl)
               for seed, (name, c, eps, mix, fl) in enumerate(GRAD_CASES)}
    results["gather"] = _gather_case(dist)
    results["topk_11"] = _topk_case(dist, 11)
    results["topk_3"] = _topk_case(dist, 3)
    results["state"] = _state_case(dist)
    results["sampled"] = _sampled_case(dist)
    results["large"] = _large_case(dist)
    cleanup(dist)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("head")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", [c[0] for c in GRAD_CASES])
def test_loss_and_gradients_match_dense(results, case):
    for rank_results in results:
        assert rank_results[case] < TOL, (case, rank_results[case])


def test_all_gather_with_grad_sums_gradients_per_rank(results):
    assert all(r["gather"] == {"forward_ok": True, "grad_error": 0.0} for r in results)


def test_topk_matches_dense(results):
    assert all(r["topk_11"] and r["topk_3"] for r in results)


def test_full_state_roundtrip_and_reshard(results):
    assert all(r["state"] for r in results)


def test_negative_sampling_is_ce_over_sampled_classes(results):
    assert all(r["sampled"] < TOL for r in results)


def test_120k_classes_split_in_half(results):
    for r in results:
        assert r["large"]["finite"] and r["large"]["grad_finite"]
        assert r["large"]["loss_error"] < TOL
        assert r["large"]["rows"] == 60_000


def test_single_process_is_plain_linear():
    dist = DistInfo()
    head = ShardedClassifierHead(4, 5, dist)
    linear = nn.Linear(4, 5)
    linear.load_state_dict(head.full_state())
    x, y = torch.randn(3, 4), torch.tensor([0, 4, 2])
    loss = head.forward_loss(x, y, label_smoothing=0.2).loss
    assert (head.start, head.end) == (0, 5)
    assert abs(loss.item() - F.cross_entropy(linear(x), y, label_smoothing=0.2).item()) < TOL


def test_load_full_state_rejects_wrong_shape():
    head = ShardedClassifierHead(4, 5, DistInfo())
    with pytest.raises(ValueError, match="weight"):
        head.load_full_state({"weight": torch.zeros(6, 4), "bias": torch.zeros(6)})
