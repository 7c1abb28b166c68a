"""Expert parallel: a MoE layer's experts split over the `ep` mesh dim, tokens sent to them by all-to-all.

Each rank routes its own tokens, sorts the (token, slot) assignments by expert, and sends each expert's rows
to the rank that holds it (all_to_all_single; differentiable, so backward sends the gradients back the same
way). The receiver regroups the rows by its local experts, runs them, and the outputs travel back. The
expert weights become DTensors sharded on the expert dim over `ep`, which is what a checkpoint records, so
DCP reshards them to any other EP degree.

MoE layers under tensor parallel run on each rank's sequence shard (the router and experts replicated over
`tp`): TP ranks route different tokens, so the MoE weights' gradients are partial sums over `tp`
(ops/moe.py: local_weight), reduced by FSDP or by reduce_partial_grads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from torchtitan.ops.moe import combine, sort_by_expert


class AllToAllDispatch:
    """Tokens to the experts' ranks and back over an expert-parallel process group."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group, self.ep = group, dist.get_world_size(group)
        self.local_experts = num_experts // self.ep
        self.num_experts = num_experts

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 experts: nn.Module) -> torch.Tensor:
        order, counts = sort_by_expert(indices, self.num_experts)
        rows = x[order // indices.shape[1]]
        # How many rows go to each (rank, local expert), and how many come from each (rank, local expert).
        send = counts.view(self.ep, self.local_experts)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # sizes must be known on the host
        received = all_to_all_single_autograd(rows, out_splits, in_splits, self.group)
        # Received rows are ordered (source rank, local expert): regroup them by local expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.local_experts, device=x.device).repeat(self.ep), recv.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        out = experts(received[regroup], recv.sum(0))
        out = out.new_empty(out.shape).index_copy(0, regroup, out)
        back = all_to_all_single_autograd(out, in_splits, out_splits, self.group)
        return combine(back, order, weights)


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placements: list) -> None:
    p = getattr(module, name)
    dt = distribute_tensor(p.data, mesh, placements, src_data_rank=None)
    setattr(module, name, nn.Parameter(dt, requires_grad=p.requires_grad))


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE feed-forwards of a decoder (or of its pipeline stage)."""
    return [b.feed_forward for b in model.layers.values() if b.feed_forward.is_moe]


def apply_moe_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Expert parallel and/or the MoE layers' part of tensor parallel, in place (after the dense TP plan,
    before FSDP). `mesh` has the dims "ep" (experts sharded on their first dim), "tp" (replicated, each rank
    routing its own sequence shard), or both. Parameters are still on the meta device: this costs nothing."""
    names = mesh.mesh_dim_names
    expert_placements = [Shard(0) if n == "ep" else Replicate() for n in names]
    for moe in moe_layers(model):
        for name, _ in list(moe.experts.named_parameters(recurse=False)):  # weights and biases, (E, ...)
            _distribute(moe.experts, name, mesh, expert_placements)
        if "ep" in names:
            moe.dispatcher = AllToAllDispatch(mesh["ep"].get_group(), moe.num_experts)
            # Data parallel averages gradients over dp x cp ranks; expert gradients already sum over the ep
            # ranks (their tokens all come to the expert) and FSDP averages them over the rest only.
            moe.experts.grad_scale = 1.0 / mesh["ep"].size()
        if "tp" in names:
            for name, _ in list(moe.router.gate.named_parameters(recurse=False)):
                _distribute(moe.router.gate, name, mesh["tp"], [Replicate()])
            if moe.shared_expert is not None:  # replicated; each rank runs it on its own tokens
                for linear in (moe.shared_expert.w1, moe.shared_expert.w2, moe.shared_expert.w3):
                    _distribute(linear, "weight", mesh["tp"], [Replicate()])


def reduce_partial_grads(params: list[torch.Tensor]) -> None:
    """Sum gradients left partial over replicated mesh dims (MoE weights under TP without FSDP, which would
    otherwise reduce them): once per step, after the last micro-batch."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=p.placements)
