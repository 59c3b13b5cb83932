"""The 100k+ class classifier head, sharded by class across ranks, and its cross-entropy.

Each rank holds rows [start, end) of the full Linear(num_features, num_classes): ceil(C / world)
classes per rank (the last ranks may hold fewer, or none when C < world). Features are all-gathered,
so every rank scores the global batch against its own classes, and the softmax cross-entropy is
combined across ranks from [B]-sized reductions (max, sum-exp, target logit, sum of logits): no rank
ever holds a B x C tensor, and head memory and gradient traffic per rank fall as 1 / world.
Like insightface's partial_fc_v2.py, including its optional negative-class sampling.

Gradient scale convention (what the tests check against the dense model on the global batch):
- the loss is the mean over the global batch and is identical on every rank;
- head rows get the exact dense gradient on their owner rank (no all-reduce: nobody else has them);
- the all-gather backward sums every rank's feature gradient, giving each rank the exact dense
  gradient of its own features; DDP then *averages* backbone gradients over ranks, so the head
  multiplies feature gradients by world_size (`backbone_grad_scale`) and the averaged backbone
  gradient equals the dense one. Do not also scale the loss by world_size.

Collectives go through pretrain.dist (the one module that knows ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.dist import (DistInfo, all_gather, all_gather_with_grad, all_reduce_, all_reduce_sum,
                           broadcast_object, gather)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Class rows [start, end) held by `rank`: ceil(C / world) each, the tail ranks fewer or none."""
    rows_per_rank = math.ceil(num_classes / world_size)
    start = min(rank * rows_per_rank, num_classes)
    return start, min(start + rows_per_rank, num_classes)


def gather_rows(local: torch.Tensor, num_classes: int, dist: DistInfo, dst: int | None = None) -> torch.Tensor | None:
    """Rebuild a full [C, ...] tensor from every rank's row slice (weights, bias, optimizer state).

    Slices are padded to ceil(C / world) rows so one equal-sized collective suffices, then trimmed.
    dst=None: every rank gets the result (all_gather); dst=r: only rank r does, the others get None.
    """
    rows_per_rank = math.ceil(num_classes / dist.world_size)
    local = local.detach()
    if local.shape[0] < rows_per_rank:
        pad = local.new_zeros((rows_per_rank - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    full = all_gather(local, dist) if dst is None else gather(local, dist, dst)
    return None if full is None else full[:num_classes].clone()


def slice_rows(full: torch.Tensor, num_classes: int, dist: DistInfo) -> torch.Tensor:
    """This rank's rows of a full [C, ...] tensor (any saved world size resumes on any other)."""
    if full.shape[0] != num_classes:
        raise ValueError(f"expected {num_classes} rows, got a tensor of shape {tuple(full.shape)}")
    start, end = shard_range(num_classes, dist.world_size, dist.rank)
    return full[start:end]


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch, the classes spread over ranks.

    Per sample, with eps = label smoothing and (a, b, lam) the mixup pair:
        loss = lse - (1 - eps) * (lam * z_a + (1 - lam) * z_b) - eps * sum_c(z_c) / C
    which is lam * CE(a) + (1 - lam) * CE(b), each with label smoothing, as F.cross_entropy defines it.
    Written by hand (not with differentiable all_reduces) because the gradient needs no communication:
    d loss / d z = (softmax - (1 - eps) * (lam * onehot_a + (1 - lam) * onehot_b) - eps / C) / B.
    """

    @staticmethod
    def forward(ctx, logits, index_a, index_b, lam, label_smoothing: float, dist: DistInfo):
        z = logits.float()
        batch, width = z.shape
        if width:
            row_max = z.max(dim=1).values
        else:
            row_max = z.new_full((batch,), -math.inf)
        all_reduce_(row_max, dist, op="max")
        # Everything below is shifted by the global row max (it cancels in the loss); `shifted` is a
        # new tensor, so the caller's logits stay intact for accuracy metrics.
        shifted = z - row_max[:, None]
        z_a, z_b = _pick(shifted, index_a), _pick(shifted, index_b)
        z_sum = shifted.sum(dim=1)
        exp = shifted.exp_()
        packed = torch.cat([exp.sum(dim=1), z_a, z_b, z_sum, z.new_tensor([float(width)])])
        all_reduce_(packed, dist, op="sum")
        sum_exp, z_a, z_b, z_sum = packed[:-1].view(4, batch)
        num_classes = packed[-1]  # a tensor: reading it would be a host sync
        eps = label_smoothing
        per_sample = (sum_exp.log() - (1 - eps) * (lam * z_a + (1 - lam) * z_b)
                      - eps * z_sum / num_classes)
        probs = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, index_a, index_b, lam)
        ctx.eps, ctx.num_classes, ctx.dtype = eps, num_classes, logits.dtype
        return per_sample.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        # Consumes the saved probabilities in place: backward runs once per forward (no retain_graph).
        grad, index_a, index_b, lam = ctx.saved_tensors
        batch, width = grad.shape
        if width:
            eps = ctx.eps
            grad.sub_(eps / ctx.num_classes)
            for index, weight in ((index_a, lam), (index_b, 1 - lam)):
                on_rank = index >= 0
                delta = torch.where(on_rank, -(1 - eps) * weight, 0.0)
                grad.scatter_add_(1, index.clamp(min=0)[:, None], delta[:, None].to(grad.dtype))
            grad.mul_(grad_loss / batch)
        return grad.to(ctx.dtype), None, None, None, None, None


def _pick(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """z[i, index[i]] where index[i] >= 0, else 0 (the target lives on another rank)."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    picked = z.gather(1, index.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(index >= 0, picked, 0.0)


def _local_index(targets: torch.Tensor, class_start: int, width: int) -> torch.Tensor:
    index = targets - class_start
    return torch.where((index >= 0) & (index < width), index, -1)


def _lam_tensor(lam, batch: int, device) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float32, device=device)
    return lam.expand(batch).contiguous() if lam.dim() == 0 else lam.float()


def sharded_cross_entropy(local_logits: torch.Tensor, targets_global: torch.Tensor, dist: DistInfo, *,
                          class_start: int, label_smoothing: float = 0.0,
                          targets_b: torch.Tensor | None = None, lam: float | torch.Tensor = 1.0,
                          column_map: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the global batch; the same value on every rank.

    local_logits [B_global, end - start]: this rank's classes for the whole global batch.
    targets_global [B_global] int64 class ids. Mixup/cutmix: loss = lam * CE(targets) +
    (1 - lam) * CE(targets_b), lam a float or a [B_global] tensor, both with label smoothing.
    column_map [end - start]: column of local_logits for each of this rank's classes, -1 when not
    scored (sampled logits, see ShardedClassifierHead.forward_loss); None = column i is class start+i.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    batch, width = local_logits.shape
    if targets_b is None:
        targets_b, lam = targets_global, 1.0
    num_local = width if column_map is None else len(column_map)
    index_a = _local_index(targets_global, class_start, num_local)
    index_b = _local_index(targets_b, class_start, num_local)
    if column_map is not None:
        index_a = torch.where(index_a >= 0, column_map[index_a.clamp(min=0)], -1)
        index_b = torch.where(index_b >= 0, column_map[index_b.clamp(min=0)], -1)
    lam = _lam_tensor(lam, batch, local_logits.device)
    return _ShardedCrossEntropy.apply(local_logits, index_a, index_b, lam, float(label_smoothing), dist)


def sharded_topk_correct(local_logits: torch.Tensor, targets_global: torch.Tensor, dist: DistInfo,
                         class_start: int, ks: tuple[int, ...] = (1, 5),
                         class_ids: torch.Tensor | None = None) -> dict[int, int]:
    """{k: number of samples of the global batch whose target is among the top-k classes}.

    Each rank sends its local top-k (values and class ids) and the winners are picked from those
    world * k candidates: B x k numbers per rank instead of B x C. Same result on every rank.
    class_ids maps columns to class ids when the columns are a sample (see HeadOutput).
    """
    top_ids = _global_topk_ids(local_logits, dist, class_start, max(ks), class_ids)
    hits = top_ids == targets_global[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum().item()) for k in ks}


def _global_topk_ids(local_logits, dist, class_start, k, class_ids):
    batch, width = local_logits.shape
    local_k = min(k, width)
    values, index = local_logits.detach().float().topk(local_k, dim=1)
    ids = index + class_start if class_ids is None else class_ids[index]
    if local_k < k:  # pad so every rank sends the same shape; -inf never beats a real logit
        values = torch.cat([values, values.new_full((batch, k - local_k), -math.inf)], dim=1)
        ids = torch.cat([ids, ids.new_full((batch, k - local_k), -1)], dim=1)
    world = dist.world_size
    values = all_gather(values.contiguous(), dist).view(world, batch, k).permute(1, 0, 2).reshape(batch, -1)
    ids = all_gather(ids.contiguous(), dist).view(world, batch, k).permute(1, 0, 2).reshape(batch, -1)
    best = values.topk(k, dim=1).indices
    return ids.gather(1, best)


@dataclass
class HeadOutput:
    loss: torch.Tensor            # mean over the global batch, identical on every rank
    logits: torch.Tensor          # [B_global, columns] this rank's (possibly sampled) classes
    targets: torch.Tensor         # [B_global] gathered targets
    class_ids: torch.Tensor | None  # global class id per column when sampled, None = start..end-1


class ShardedClassifierHead(nn.Module):
    """Rows [start, end) of Linear(num_features, num_classes); see the module docstring.

    sample_ratio < 1 (training only, forward_loss only): each step a rank scores its classes that
    appear in the global batch plus a random subset of its others, ceil(ratio * rows) in all
    (PartialFC); label smoothing then spreads over the sampled classes. 1.0 is exact.
    backbone_grad_scale: factor on feature gradients; None = world_size (DDP averages, see above).
    """

    def __init__(self, num_features: int, num_classes: int, dist: DistInfo, bias: bool = True,
                 sample_ratio: float = 1.0, *, backbone_grad_scale: float | None = None,
                 init_seed: int | None = None):
        super().__init__()
        if num_classes < 1 or num_features < 1:
            raise ValueError(f"num_classes and num_features must be >= 1, got {num_classes}, {num_features}")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        self.num_features, self.num_classes, self.dist = num_features, num_classes, dist
        self.start, self.end = shard_range(num_classes, dist.world_size, dist.rank)
        self.sample_ratio = sample_ratio
        self.backbone_grad_scale = float(dist.world_size if backbone_grad_scale is None else backbone_grad_scale)
        rows = self.end - self.start
        self.weight = nn.Parameter(torch.empty(rows, num_features, device=dist.device))
        self.bias = nn.Parameter(torch.empty(rows, device=dist.device)) if bias else None
        if init_seed is None:  # one seed for all ranks, so the full head does not depend on world size
            init_seed = broadcast_object(int(torch.randint(0, 2**31, ()).item()), dist)
        self.init_seed = init_seed
        self.sample_generator = torch.Generator().manual_seed(init_seed + 1 + dist.rank)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, block_rows: int = 4096) -> None:
        """nn.Linear's init, drawn per block of classes from (init_seed, block): the full matrix is
        the same whatever the world size, and no rank materialises more than its rows + 2 blocks."""
        bound = 1.0 / math.sqrt(self.num_features)
        for block in range(self.start // block_rows, math.ceil(self.end / block_rows)):
            lo, hi = block * block_rows, min((block + 1) * block_rows, self.num_classes)
            gen = torch.Generator().manual_seed((self.init_seed * 1_000_003 + block) % 2**63)
            values = torch.rand(hi - lo, self.num_features + 1, generator=gen).mul_(2 * bound).sub_(bound)
            a, b = max(lo, self.start), min(hi, self.end)
            self.weight[a - self.start:b - self.start].copy_(values[a - lo:b - lo, :-1])
            if self.bias is not None:
                self.bias[a - self.start:b - self.start].copy_(values[a - lo:b - lo, -1])

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_classes={self.num_classes}, "
                f"rows=[{self.start}, {self.end}), sample_ratio={self.sample_ratio}")

    def gather_features(self, features_local: torch.Tensor) -> torch.Tensor:
        return all_gather_with_grad(features_local, self.dist, grad_scale=self.backbone_grad_scale)

    def forward(self, features_local: torch.Tensor) -> torch.Tensor:
        """Local logits [B_global, end - start] of the all-gathered features (gradients flow back)."""
        return F.linear(self.gather_features(features_local), self.weight, self.bias)

    def forward_loss(self, features_local: torch.Tensor, targets_local: torch.Tensor, *,
                     label_smoothing: float = 0.0, targets_b_local: torch.Tensor | None = None,
                     lam: float | torch.Tensor = 1.0) -> HeadOutput:
        """Gather targets (and per-sample lam), score, and compute the loss; handles sampling.

        Collective: every rank must pass the same kinds of arguments (targets_b_local given or None on
        all ranks, lam a per-sample tensor on all ranks or a number on all ranks), whatever its values.
        """
        targets = all_gather(targets_local, self.dist)
        targets_b = None if targets_b_local is None else all_gather(targets_b_local, self.dist)
        if isinstance(lam, torch.Tensor) and lam.dim() > 0:
            lam = all_gather(lam.float(), self.dist)
        features = self.gather_features(features_local)
        if not self.training or self.sample_ratio >= 1.0:
            logits = F.linear(features, self.weight, self.bias)
            loss = sharded_cross_entropy(logits, targets, self.dist, class_start=self.start,
                                         label_smoothing=label_smoothing, targets_b=targets_b, lam=lam)
            return HeadOutput(loss, logits, targets, None)
        columns = self.sample_columns(targets, targets_b)
        column_map = torch.full((self.end - self.start,), -1, dtype=torch.long, device=columns.device)
        column_map[columns] = torch.arange(len(columns), device=columns.device)
        bias = None if self.bias is None else self.bias[columns]
        logits = F.linear(features, self.weight[columns], bias)
        loss = sharded_cross_entropy(logits, targets, self.dist, class_start=self.start,
                                     label_smoothing=label_smoothing, targets_b=targets_b, lam=lam,
                                     column_map=column_map)
        return HeadOutput(loss, logits, targets, columns + self.start)

    def sample_columns(self, targets: torch.Tensor, targets_b: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted local rows to score this step: every positive on this rank plus random negatives."""
        rows = self.end - self.start
        num_sample = math.ceil(self.sample_ratio * rows)
        score = torch.rand(rows, generator=self.sample_generator).to(self.weight.device)
        for t in (targets, targets_b):
            if t is not None:
                local = t - self.start
                score[local[(local >= 0) & (local < rows)]] = 2.0  # positives always win
        num_positive = int((score == 2.0).sum().item())
        keep = score.topk(max(num_sample, num_positive)).indices
        return keep.sort().values

    @torch.no_grad()
    def full_state(self, dst: int | None = None) -> dict[str, torch.Tensor]:
        """The full 'weight' [C, F] and 'bias' [C] (collective: all ranks call it).

        dst=None: on every rank; dst=r: on rank r only (the others get {}), which is what exporting a
        checkpoint needs: one gather of C x (F + 1) numbers instead of an all_gather onto every rank.
        """
        local = self.weight if self.bias is None else torch.cat([self.weight, self.bias[:, None]], dim=1)
        full = gather_rows(local, self.num_classes, self.dist, dst)  # weight and bias in one collective
        if full is None:
            return {}
        if self.bias is None:
            return {"weight": full}
        return {"weight": full[:, :-1].contiguous(), "bias": full[:, -1].contiguous()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's rows of a full weight/bias (e.g. saved at another world size)."""
        expected = {"weight": (self.num_classes, self.num_features)}
        if self.bias is not None:
            expected["bias"] = (self.num_classes,)
        for name, shape in expected.items():
            if name not in state:
                raise ValueError(f"head state lacks '{name}' (has {sorted(state)})")
            if tuple(state[name].shape) != shape:
                raise ValueError(f"head state '{name}' has shape {tuple(state[name].shape)}, expected {shape}")
            getattr(self, name).copy_(slice_rows(state[name], self.num_classes, self.dist))


def clip_grad_norm_(replicated_params, sharded_params, max_norm: float, dist: DistInfo) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a DDP backbone plus a sharded head: the head's squared norm
    is summed over ranks (each holds different rows), the backbone's (identical on all ranks) is not.

    Returns the total norm before clipping as a 0-dim fp32 tensor, the same on every rank. No host
    sync: the norms are foreach kernels, the scale is applied on the device even when it is 1.0, and
    one all_reduce of a scalar is the only collective. This is the one gradient-clipping path.
    """
    replicated = [p.grad for p in replicated_params if p.grad is not None]
    sharded = [p.grad for p in sharded_params if p.grad is not None]
    device = (replicated + sharded)[0].device if replicated + sharded else dist.device

    def squared(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()

    total = (all_reduce_sum(squared(sharded), dist) + squared(replicated)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = replicated + sharded
    if grads:
        torch._foreach_mul_(grads, scale)
    return total
