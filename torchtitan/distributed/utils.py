"""Process-group setup, global reductions and gradient clipping across every mesh."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan.tools.device import backend_for


def init_distributed(device_type: str, init_timeout_seconds: int, fake: bool = False) -> tuple[int, int]:
    """Start the default process group when launched by torchrun (or the fake backend); return (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        return rank, world
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend_for(device_type), timeout=datetime.timedelta(seconds=init_timeout_seconds))
    return rank, world


def set_pg_timeout(seconds: int) -> None:
    """After the first step, collectives should fail fast rather than hang for the init timeout."""
    if dist.is_initialized() and dist.get_backend() != "fake":
        from torch.distributed.distributed_c10d import _get_default_group

        try:
            _get_default_group()._get_backend(torch.device("cpu")).options._timeout = datetime.timedelta(
                seconds=seconds)
        except Exception:
            pass  # not every backend exposes a settable timeout; the init timeout then stays


def mesh_group(mesh):
    """One process group over every rank of `mesh` (a flattened copy of a multi-dimensional one)."""
    return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group`; None means a trivial group (nothing to reduce), never the world."""
    if group is not None and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, pp_group=None, foreach: bool | None = None,
                    norm_exclude: list[torch.Tensor] = ()) -> torch.Tensor:
    """Global L2 gradient norm over all shards (FSDP/TP DTensors) and pipeline stages; clip if max_norm > 0.
    norm_exclude: parameters clipped but not counted (a second copy of a tied weight)."""
    params = [p for p in parameters if p.grad is not None]
    skip = {id(p) for p in norm_exclude}
    device = params[0].grad.device if params else torch.device("cpu")
    # Group by (mesh, placements): a DTensor norm is partial over its mesh and full_tensor() reduces it.
    groups: dict = {}
    for p in params:
        g = p.grad
        groups.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, []).append(p)
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    for ps in groups.values():
        ps = [p for p in ps if id(p) not in skip]
        if not ps:
            continue
        if device.type == "cpu":
            # CPU's float32 norm kernel accumulates sequentially (~1e-4 relative error on a 0.5M-element
            # gradient), enough to make layouts disagree; accumulate in float64 there.
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad, 2.0, dtype=torch.float64) for p in ps]), 2.0)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0, error_if_nonfinite=False, foreach=foreach)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float().to(device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        for ps in groups.values():  # every parameter, the excluded copies too
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total, foreach=foreach)
    return total


def set_determinism(seed: int | None, deterministic: bool, rank_offset: int = 0) -> None:
    if seed is not None:
        torch.manual_seed(seed + rank_offset)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

