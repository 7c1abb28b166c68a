"""Muon for the matrices, AdamW for the rest, in one optimizer that works on sharded parameters.

Muon (Keller Jordan; Moonlight, Kimi K2) updates a matrix with its momentum orthogonalized by a few
Newton-Schulz iterations. The iterations need the whole matrix, while FSDP2 and tensor parallel leave each rank
a shard of it. Per step, for the matrices sharded within their last two dimensions:

1. momentum and the Nesterov update on the local shards (elementwise, no communication);
2. each matrix gets an owner, round-robin over the ranks that hold its shards; one all-to-all sends every shard
   to its owner in the Newton-Schulz dtype (bfloat16 by default, torch's: its first step casts to it, so
   nothing is lost in transit), and the owner assembles the full matrix;
3. the owner orthogonalizes it (torch.optim.Muon's Newton-Schulz, batched over experts for a 3-D weight);
4. a second all-to-all returns each rank its shard of the result, and the update is applied locally.

Matrices go in rounds of one per rank; the next round's all-to-all runs while this round's Newton-Schulz
computes. A weight whose shards hold whole matrices (stacked experts sharded on the expert dimension by expert
parallel or FSDP) is orthogonalized where it lies, every local expert in one batched call. Replicated mesh
dimensions (HSDP's replicas) do the same work side by side: the shards travel only within a replica.

The update equals torch.optim.Muon's on the full matrix: same momentum, same Newton-Schulz, the same
learning-rate adjustment (on the matrix shape; per expert for a 3-D weight) and decoupled weight decay.
The AdamW groups step through torch.optim.AdamW itself (this class is one), so their state and kernels are
torch's. State per Muon parameter: `momentum_buffer`, sharded like the parameter, so DCP reshards it, and
`step` (a count, as AdamW keeps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from torchtitan.distributed.utils import mesh_group

MUON_KEYS = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "ns_eps", "ns_dtype", "adjust_lr_fn")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonalize a matrix or each matrix of a (E, m, n) stack at once: torch.optim.Muon's iteration (its
    own function for one matrix in bfloat16), in `dtype`."""
    if x.ndim == 2 and dtype == torch.bfloat16:
        return _zeropower_via_newtonschulz(x, coefficients, steps, eps)
    a, b, c = coefficients
    y = x.to(dtype).reshape(-1, *x.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        y = y.mT
    y = y / y.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        gram = y @ y.mT
        y = torch.baddbmm(y, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return (y.mT if tall else y).reshape(x.shape)


@dataclass
class _Layout:
    """Where the shards of one DTensor parameter lie within the ranks that split it."""

    group: dist.ProcessGroup | None  # None: the local shard holds whole matrices
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]  # per group rank: (local shape, global offset)

    def box(self, rank: int) -> tuple[slice, ...]:
        shape, offset = self.boxes[rank]
        return tuple(slice(o, o + n) for o, n in zip(offset, shape))

    def numel(self, rank: int) -> int:
        return int(torch.Size(self.boxes[rank][0]).numel())


def _layout(p: DTensor) -> _Layout:
    """Collective over p's mesh the first time (every rank computes every parameter's layout in one order)."""
    ndim = p.ndim
    if any(isinstance(pl, Partial) for pl in p.placements):
        raise ValueError("Muon needs reduced gradients (a Partial parameter placement)")
    split = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if all(pl.dim < ndim - 2 for pl in (p.placements[i] for i in split)):
        return _Layout(None, [])
    mesh = p.device_mesh
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError("Muon needs a named device mesh")
    sub = mesh[tuple(names[i] for i in split)] if len(split) < mesh.ndim else mesh
    group = mesh_group(sub)
    mine = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
    boxes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(boxes, mine, group=group)
    return _Layout(group, [(tuple(s), tuple(o)) for s, o in boxes])


class Muon(torch.optim.AdamW):
    """Param groups with ``muon=True`` step with Muon (keys: MUON_KEYS, plus lr and weight_decay); the others
    with AdamW. Muon parameters may be plain tensors or DTensors of any FSDP2 / TP / EP layout."""

    def __init__(self, params, *, muon_defaults: dict, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        for group in self.param_groups:
            group.setdefault("muon", False)
            if group["muon"]:
                for key in MUON_KEYS:
                    group.setdefault(key, muon_defaults[key])
        self._layouts: dict[int, _Layout] = {}
        self.bytes_communicated = 0  # all-to-all payload of this rank so far (benchmarks)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        adamw = [g for g in groups if not g["muon"]]
        try:
            self.param_groups = adamw  # torch's AdamW steps the AdamW groups (fused kernel, found_inf included)
            super().step()
        finally:
            self.param_groups = groups
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):  # a skipped step (trainer/guards.py): one host sync
            return None
        for group in groups:
            if group["muon"]:
                self._muon_group(group)
        return None

    def _muon_group(self, group: dict) -> None:
        lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
        ns = (tuple(group["ns_coefficients"]), group["ns_steps"], group["ns_eps"], NS_DTYPES[group["ns_dtype"]])
        local, sharded = [], {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = torch.zeros((), dtype=torch.float32)  # as AdamW's (its __setstate__ reads it)
            state["step"] += 1
            g, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(g, 1 - m)
            update = g.lerp(buf, m) if group["nesterov"] else buf
            layout = self._layout_of(p)
            if layout.group is None:
                local.append((p, update))
            else:
                sharded.setdefault(id(layout.group), []).append((p, update, layout))
        for p, update in local:
            self._apply(p, newton_schulz(update, *ns), lr, wd, group["adjust_lr_fn"])
        for items in sharded.values():
            for p, ortho in self._orthogonalize_sharded(items, ns):
                self._apply(p, ortho, lr, wd, group["adjust_lr_fn"])

    def _layout_of(self, p: torch.Tensor) -> _Layout:
        if not isinstance(p, DTensor):
            return _Layout(None, [])
        if id(p) not in self._layouts:
            self._layouts[id(p)] = _layout(p)
        return self._layouts[id(p)]

    @staticmethod
    def _apply(p: torch.Tensor, ortho: torch.Tensor, lr: float, wd: float, adjust_lr_fn: str | None) -> None:
        """torch.optim.Muon's update: decoupled weight decay, then the orthogonalized step at the adjusted lr
        (of one matrix: the last two dimensions of a stacked-expert weight)."""
        data = _local(p)
        data.mul_(1 - lr * wd)
        data.add_(ortho, alpha=-_adjust_lr(lr, adjust_lr_fn, p.shape[-2:]))

    def _orthogonalize_sharded(self, items: list, ns: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(param, local update, layout)] of one process group -> [(param, local shard of the orthogonalized
        full update)]: rounds of one matrix per rank, the next round's gather in flight during this one's
        Newton-Schulz."""
        group = items[0][2].group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        rounds = [items[i:i + world] for i in range(0, len(items), world)]
        out: list = []
        pending = self._gather(rounds[0], world, rank, group, ns[3])
        scatters = []
        for k, chunk in enumerate(rounds):
            full = self._assemble(chunk, rank, *pending)
            if k + 1 < len(rounds):
                pending = self._gather(rounds[k + 1], world, rank, group, ns[3])
            ortho = newton_schulz(full, *ns) if full is not None else None
            scatters.append((chunk, self._scatter(chunk, ortho, world, rank, group, ns[3])))
        for chunk, (work, recv) in scatters:
            work.wait()
            offset = 0
            for p, update, _ in chunk:
                n = update.numel()
                out.append((p, recv[offset:offset + n].view(update.shape)))
                offset += n
        return out

    def _gather(self, chunk: list, world: int, rank: int, group, dtype: torch.dtype):
        """Every rank's shard of chunk[j] goes to rank j (the round-robin owner)."""
        send = torch.cat([u.reshape(-1).to(dtype) for _, u, _ in chunk])
        in_splits = [chunk[j][1].numel() if j < len(chunk) else 0 for j in range(world)]
        out_splits = [chunk[rank][2].numel(src) if rank < len(chunk) else 0 for src in range(world)]
        recv = send.new_empty(sum(out_splits))
        self.bytes_communicated += send.numel() * send.element_size()
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=group, async_op=True)
        return work, recv, out_splits

    def _assemble(self, chunk: list, rank: int, work, recv: torch.Tensor, out_splits: list[int]):
        work.wait()
        if rank >= len(chunk):
            return None
        p, _, layout = chunk[rank]
        full = recv.new_empty(p.shape)
        for src, piece in enumerate(recv.split(out_splits)):
            full[layout.box(src)] = piece.view(layout.boxes[src][0])
        return full

    def _scatter(self, chunk: list, ortho: torch.Tensor | None, world: int, rank: int, group, dtype: torch.dtype):
        """The owner's result back to every rank as its shard; returns the pending work and the receive buffer
        (this rank's shards of the chunk's matrices, in chunk order)."""
        if ortho is not None:
            layout = chunk[rank][2]
            pieces = [ortho[layout.box(dst)].reshape(-1) for dst in range(world)]
            send = torch.cat(pieces).contiguous()
            in_splits = [t.numel() for t in pieces]
        else:
            send, in_splits = chunk[0][1].new_empty(0, dtype=dtype), [0] * world
        out_splits = [chunk[j][1].numel() if j < len(chunk) else 0 for j in range(world)]
        recv = send.new_empty(sum(out_splits))
        self.bytes_communicated += send.numel() * send.element_size()
        return dist.all_to_all_single(recv, send, out_splits, in_splits, group=group, async_op=True), recv


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place ops update the DTensor), a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t
