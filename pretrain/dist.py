"""The one module that knows ranks, process groups and collectives.

Everything else in megaclass receives a small `DistInfo` and calls the helpers here, so a single
process (world size 1) runs the same code with every collective reduced to a no-op.

`init_distributed()` picks up, in order: a process group that already exists (Ray Train's
`TorchTrainer` creates one before calling the training function), the torchrun environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), or nothing (one process).

    info = init_distributed()          # DistInfo(rank, world_size, local_rank, device, ...)
    feats = all_gather_with_grad(x, info)
    ...
    cleanup(info)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

# torch 2.14 renamed the tensor-in/tensor-out collectives; older releases (pyproject admits 2.4) lack the new names.
_all_gather_single = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor
_GLOO_REDUCE_SCATTER = hasattr(torch_dist, "reduce_scatter_single")  # gloo gained it with the rename
_reduce_scatter_single = getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. world_size 1 means no process group is used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    owns_group: bool = False  # True when init_distributed created the group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(backend: str, local_rank: int, use_gpu: bool | None) -> torch.device:
    cuda_ok = torch.cuda.is_available() and (use_gpu is None or use_gpu)
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but torch.cuda.is_available() is False")
    if backend == "gloo" and use_gpu is None:
        cuda_ok = False  # a gloo job without an explicit GPU request is a CPU job
    if not cuda_ok:
        return torch.device("cpu")
    # torchrun: one process per GPU on a node, LOCAL_RANK picks it (one visible GPU: it is ours).
    num_gpus = torch.cuda.device_count()
    return torch.device("cuda", 0 if num_gpus == 1 else local_rank % num_gpus)


def init_distributed(backend: str | None = None, *, use_gpu: bool | None = None) -> DistInfo:
    """Join the existing process group, or create one from torchrun env vars, or run alone.

    backend: "gloo" or "nccl"; None picks nccl when a GPU is used, gloo otherwise.
    use_gpu: None = use CUDA when available; False = CPU; True = CUDA or fail.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch_dist.is_available() and torch_dist.is_initialized():
        group_backend = str(torch_dist.get_backend())
        device = _pick_device(group_backend, local_rank, use_gpu)
        if device.type == "cuda":
            # Ray Train selects the worker's GPU with torch.cuda.set_device before calling us.
            device = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device,
                        group_backend, owns_group=False)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if not torch_dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world_size} but torch.distributed is not available")
        want_gpu = (torch.cuda.is_available() and backend != "gloo") if use_gpu is None else use_gpu
        if backend is None:
            backend = "nccl" if want_gpu else "gloo"
        device = _pick_device(backend, local_rank, want_gpu)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank = int(os.environ["RANK"])
        torch_dist.init_process_group(backend=backend, init_method="env://",
                                      rank=rank, world_size=world_size)
        log.info("process group %s: rank %d of %d on %s", backend, rank, world_size, device)
        return DistInfo(rank, world_size, local_rank, device, backend, owns_group=True)

    return DistInfo(0, 1, 0, _pick_device("none", 0, use_gpu), "none", owns_group=False)


def cleanup(dist: DistInfo) -> None:
    """Destroy the process group if this module created it (Ray Train owns its own)."""
    if dist.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.is_distributed:
        if dist.backend == "nccl":
            torch_dist.barrier(device_ids=[dist.device.index])
        else:
            torch_dist.barrier()


def _as_tensor(value: float | int | torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(dist.device).clone()
    return torch.tensor(float(value), dtype=torch.float64, device=dist.device)


def _reduce(value, dist: DistInfo, op):
    if not dist.is_distributed:
        return value.detach().clone() if isinstance(value, torch.Tensor) else value
    t = _as_tensor(value, dist)
    torch_dist.all_reduce(t, op=op)
    if isinstance(value, torch.Tensor):
        return t.to(value.device)
    return type(value)(t.item()) if isinstance(value, int) else float(t.item())


def all_reduce_sum(value: float | int | torch.Tensor, dist: DistInfo):
    """Sum over ranks; returns the same kind (python number or a new tensor, no autograd)."""
    return _reduce(value, dist, torch_dist.ReduceOp.SUM)


def all_reduce_max(value: float | int | torch.Tensor, dist: DistInfo):
    return _reduce(value, dist, torch_dist.ReduceOp.MAX)


def all_reduce_(tensor: torch.Tensor, dist: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce of a tensor ("sum" or "max"), no autograd; returns the tensor."""
    if dist.is_distributed:
        reduce_op = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX,
                     "min": torch_dist.ReduceOp.MIN}[op]
        torch_dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_gather(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (no autograd), rank order."""
    if not dist.is_distributed:
        return x
    x = x.contiguous()
    out = torch.empty((dist.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)
    return out


def gather(x: torch.Tensor, dist: DistInfo, dst: int = 0) -> torch.Tensor | None:
    """Like all_gather, but only rank `dst` receives the result (others get None): 1/world the traffic
    and memory of all_gather when one rank needs the whole thing (e.g. exporting the head)."""
    if not dist.is_distributed:
        return x
    x = x.contiguous()
    if dist.rank != dst:
        torch_dist.gather(x, None, dst=dst)
        return None
    parts = [torch.empty_like(x) for _ in range(dist.world_size)]
    torch_dist.gather(x, parts, dst=dst)
    return torch.cat(parts)


def gather_object(obj: Any, dist: DistInfo, dst: int = 0) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank `dst`, None elsewhere (small picklable things)."""
    if not dist.is_distributed:
        return [obj]
    box = [None] * dist.world_size if dist.rank == dst else None
    torch_dist.gather_object(obj, box, dst=dst)
    return box


def broadcast_object(obj: Any, dist: DistInfo, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every rank (small things: paths, configs, seeds)."""
    if not dist.is_distributed:
        return obj
    box = [obj if dist.rank == src else None]
    torch_dist.broadcast_object_list(box, src=src, device=dist.device if dist.backend == "nccl" else None)
    return box[0]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: every rank's gradient for the gathered tensor is
    summed over ranks and each rank keeps the rows of its own input (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dist: DistInfo, grad_scale: float) -> torch.Tensor:
        ctx.dist = dist
        ctx.grad_scale = grad_scale
        ctx.rows = x.shape[0]
        # A Function must not hand its input back unchanged (autograd would alias them).
        return all_gather(x, dist) if dist.is_distributed else x.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dist, rows = ctx.dist, ctx.rows
        grad_out = grad_out.contiguous()
        dtype = grad_out.dtype
        if dist.is_distributed:
            # The ranks' partial gradients are summed in fp32: a bf16 sum over many ranks loses bits.
            grad_out = grad_out.float()
            if dist.backend != "gloo" or _GLOO_REDUCE_SCATTER:
                grad = torch.empty((rows, *grad_out.shape[1:]), dtype=grad_out.dtype, device=grad_out.device)
                _reduce_scatter_single(grad, grad_out)
            else:
                # older gloo has no reduce_scatter: all_reduce the whole gradient, keep our rows.
                grad_out = grad_out.clone()
                torch_dist.all_reduce(grad_out)
                grad = grad_out[dist.rank * rows:(dist.rank + 1) * rows]
        else:
            grad = grad_out
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return grad.to(dtype), None, None


def all_gather_with_grad(x: torch.Tensor, dist: DistInfo, grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order); gradients flow back to each rank's x.

    Every rank must pass the same shape. The gradient reaching x on rank r is the sum over ranks of
    d(loss on that rank)/d(rows of rank r), times `grad_scale` (see head.py for why the sharded head
    uses world_size there: DDP averages the backbone gradients afterwards).
    """
    if not dist.is_distributed and grad_scale == 1.0:
        return x
    return _AllGatherWithGrad.apply(x, dist, float(grad_scale))


def replica_spread(values: torch.Tensor, dist: DistInfo) -> float:
    """max over elements of (max over ranks - min over ranks) of a 1-D tensor: 0.0 when every rank holds
    the same values (e.g. per-parameter sums of a DDP replica), one all_reduce and one host sync."""
    if not dist.is_distributed:
        return 0.0
    both = torch.cat([values.double(), -values.double()])
    all_reduce_(both, dist, op="max")
    highest, neg_lowest = both.chunk(2)
    return float((highest + neg_lowest).max().item()) if len(values) else 0.0


@torch.no_grad()
def sync_buffers(modules: Iterable[torch.nn.Module], dist: DistInfo) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of `modules` over ranks in place,
    one all_reduce per dtype. Integer buffers (num_batches_tracked) are the same on every rank already."""
    if not dist.is_distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        all_reduce_(flat, dist)
        flat /= dist.world_size
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(value.view_as(buffer))
