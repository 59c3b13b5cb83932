"""A run checkpoint's train_state/: everything needed to continue a run, via torch.distributed.checkpoint.

What is saved (tensors only; loading goes through pretrain.checkpoint.SafeDCPReader, which reads
DCP's index through an exact allowlist and refuses any entry that is not a tensor, so a train_state
written by someone else cannot run code when a run resumes):
    backbone/*   backbone state (replicated; DCP writes it once)
    ema/*        the EMA backbone, when on
    head/weight, head/bias   the sharded head as DTensors sharded on dim 0 (one chunk per rank,
                 ceil(C/world) rows, like pretrain.head.shard_range) -- DCP reshards them on load,
                 so a run saved at world size 2 resumes at 1 and vice versa
    optim/NAME/KEY  optimizer state per parameter name (head rows sharded like the head)
    optim_group/I/step  per-group step counters some optimizers keep (timm's LAMB)
    progress     [step, epoch, steps_in_epoch (optimizer steps), world_size]
    rng/rank-R/* torch (and CUDA) RNG and the head's negative-sampling generator of rank R,
                 restored only when the world size is unchanged
The LR schedule is a pure function of the step (timm scheduler `step_update`), so it is not saved.

DTensor/DeviceMesh plumbing is kept here rather than in pretrain.dist because it exists only to
give DCP a sharding description of the head; everything else about ranks comes from DistInfo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from pretrain.checkpoint import TRAIN_STATE_DIR, SafeDCPReader, file_sha256, read_state_metadata
from pretrain.dist import DistInfo, gather_object


@dataclass
class Progress:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch of the next batch
    steps_in_epoch: int = 0  # optimizer steps of `epoch` already done (world-size independent)
    world_size: int = 1      # world size when saved


def _mesh(dist: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(dist.device.type, (dist.world_size,))


def _shard(local: torch.Tensor, full_rows: int, mesh) -> torch.Tensor:
    """View this rank's rows as a DTensor of the full [full_rows, ...] tensor (no copy)."""
    if mesh is None:
        return local
    from torch.distributed.tensor import DTensor, Shard
    shape = torch.Size((full_rows, *local.shape[1:]))
    stride = torch.empty((0, *shape[1:])).stride() if len(shape) > 1 else (1,)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise lazily created optimizer state with a zero-lr, zero-grad step (no parameter changes)."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _state_dict(*, backbone: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None,
                progress: Progress, dist: DistInfo, with_rng: bool) -> dict[str, torch.Tensor]:
    mesh = _mesh(dist) if dist.world_size > 1 else None
    head_params = {id(p): name for name, p in head.named_parameters()}
    state: dict[str, torch.Tensor] = {f"backbone/{k}": v for k, v in backbone.state_dict().items()}
    if ema is not None:
        state.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    for name, p in head.named_parameters():
        state[f"head/{name}"] = _shard(p.data, head.num_classes, mesh)
    names = {id(p): f"backbone.{n}" for n, p in backbone.named_parameters()}
    names.update({pid: f"head.{n}" for pid, n in head_params.items()})
    for p, slots in optimizer.state.items():
        for key, value in slots.items():
            if not isinstance(value, torch.Tensor):
                continue
            if id(p) in head_params and value.dim() >= 1 and value.shape == p.shape:
                value = _shard(value, head.num_classes, mesh)
            state[f"optim/{names[id(p)]}/{key}"] = value
    for index, group in enumerate(optimizer.param_groups):
        step = group.get("step")
        if isinstance(step, (int, float, torch.Tensor)):
            state[f"optim_group/{index}/step"] = step if isinstance(step, torch.Tensor) else torch.tensor(step)
    state["progress"] = torch.tensor([progress.step, progress.epoch, progress.steps_in_epoch, progress.world_size])
    if with_rng:
        state[f"rng/rank-{dist.rank}/torch"] = torch.get_rng_state()
        state[f"rng/rank-{dist.rank}/head_sample"] = head.sample_generator.get_state()  # PartialFC negatives
        if dist.device.type == "cuda":
            state[f"rng/rank-{dist.rank}/cuda"] = torch.cuda.get_rng_state(dist.device)
    return state


def save_train_state(url: str, *, backbone: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: nn.Module | None, progress: Progress, dist: DistInfo) -> dict[str, str]:
    """Collective: every rank calls it with the same `url` (a dir on storage all ranks share).

    Returns, on rank 0, {"train_state/NAME": sha256} of every file written ({} on the other ranks):
    each rank hashes the files it wrote itself, in parallel and while they are in the page cache,
    so rank 0 never re-reads the other ranks' shards (pretrain.checkpoint.save_checkpoint known_sums).
    """
    # Every rank's RNG state under its own key: gather them so the saved set is complete.
    state = _state_dict(backbone=backbone, head=head, optimizer=optimizer, ema=ema, progress=progress,
                        dist=dist, with_rng=True)
    if dist.world_size > 1:
        import torch.distributed as torch_dist
        rng = [None] * dist.world_size
        torch_dist.all_gather_object(rng, {k: v for k, v in state.items() if k.startswith("rng/")})
        for part in rng:
            state.update(part)
    metadata = dcp.save(state, storage_writer=FsspecWriter(url), no_dist=dist.world_size == 1)
    # DCP names rank r's data files "__r_N.distcp"; rank 0 also writes the index (.metadata).
    mine = sorted({info.relative_path for info in metadata.storage_data.values()
                   if info.relative_path.startswith(f"__{dist.rank}_")})
    mine += [".metadata"] if dist.is_main else []
    digests = {f"{TRAIN_STATE_DIR}/{name}": file_sha256(f"{url.rstrip('/')}/{name}") for name in mine}
    parts = gather_object(digests, dist)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else {}


def read_progress(url: str) -> Progress:
    read_state_metadata(url)  # refuses a hostile index with a CheckpointError naming the file
    state = {"progress": torch.zeros(4, dtype=torch.long)}
    dcp.load(state, storage_reader=SafeDCPReader(url), no_dist=True)
    step, epoch, steps_in_epoch, world_size = (int(v) for v in state["progress"])
    return Progress(step, epoch, steps_in_epoch, world_size)


def load_train_state(url: str, *, backbone: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                     ema: nn.Module | None, dist: DistInfo) -> Progress:
    """Collective: restore everything in place; RNG only when the world size is the one saved."""
    saved = read_progress(url)
    _init_optimizer_state(optimizer)
    state = _state_dict(backbone=backbone, head=head, optimizer=optimizer, ema=ema, progress=saved, dist=dist,
                        with_rng=saved.world_size == dist.world_size)
    dcp.load(state, storage_reader=SafeDCPReader(url), no_dist=dist.world_size == 1)
    # Non-parameter buffers (BatchNorm's num_batches_tracked etc.) may be replaced rather than copied.
    backbone.load_state_dict({k[len("backbone/"):]: v for k, v in state.items() if k.startswith("backbone/")})
    if ema is not None:
        ema.load_state_dict({k[len("ema/"):]: v for k, v in state.items() if k.startswith("ema/")})
    for index, group in enumerate(optimizer.param_groups):
        key = f"optim_group/{index}/step"
        if key in state and not isinstance(group["step"], torch.Tensor):  # tensors were loaded in place
            group["step"] = type(group["step"])(state[key].item())
    rng_key = f"rng/rank-{dist.rank}/torch"
    if rng_key in state:
        torch.set_rng_state(state[rng_key])
        head.sample_generator.set_state(state[f"rng/rank-{dist.rank}/head_sample"])
        if f"rng/rank-{dist.rank}/cuda" in state:
            torch.cuda.set_rng_state(state[f"rng/rank-{dist.rank}/cuda"], dist.device)
    return saved
