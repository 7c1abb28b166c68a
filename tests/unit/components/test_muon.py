"""Muon (components/muon.py): torch.optim.Muon's update on plain and sharded matrices, AdamW's on the rest."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

from tests.launch import free_port
from torchtitan.components.muon import Muon, newton_schulz
from torchtitan.components.param_groups import Role, excluded_roles, muon_groups, parameter_roles
from torchtitan.models import get_train_spec

NS = (3.4445, -4.775, 2.0315)


def _defaults(**kw) -> dict:
    d = dict(momentum=0.95, nesterov=True, ns_coefficients=NS, ns_steps=5, ns_eps=1e-7, ns_dtype="bfloat16",
             adjust_lr_fn="match_rms_adamw")
    d.update(kw)
    return d


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matrices_step_exactly_as_torch_muon(adjust, nesterov):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(40, 8))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon([{"params": ours, "muon": True}], muon_defaults=_defaults(nesterov=nesterov, adjust_lr_fn=adjust),
               lr=0.02, weight_decay=0.1)
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert not torch.equal(a, torch.zeros_like(a))
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], ref_opt.state[ref[0]]["momentum_buffer"])


def test_other_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    b2 = nn.Parameter(b.detach().clone())
    opt = Muon([{"params": [w], "muon": True}, {"params": [b], "muon": False, "weight_decay": 0.0}],
               muon_defaults=_defaults(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    ref = torch.optim.AdamW([b2], lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    for _ in range(5):
        b.grad, w.grad = torch.randn_like(b), torch.randn_like(w)
        b2.grad = b.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(b, b2)
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}


def test_stacked_experts_are_orthogonalized_each_like_one_matrix():
    torch.manual_seed(0)
    for shape in ((3, 16, 24), (3, 40, 24)):
        x = torch.randn(*shape)
        batched = newton_schulz(x, NS, 5, 1e-7)
        each = torch.stack([_zeropower_via_newtonschulz(m, NS, 5, 1e-7) for m in x])
        assert torch.equal(batched, each)
    # float32 Newton-Schulz: the singular values land in the band torch's coefficients aim for (about 0.7..1.2)
    s = torch.linalg.svdvals(newton_schulz(torch.randn(4, 32, 48), NS, 5, 1e-7, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())


def test_a_skipped_step_changes_nothing():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt = Muon([{"params": [w], "muon": True}, {"params": [b], "muon": False}], muon_defaults=_defaults(),
               lr=1e-2, fused=True)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    before = (w.detach().clone(), b.detach().clone())
    opt.grad_scale, opt.found_inf = None, torch.ones(())  # what OptimizersContainer.step(skip=...) sets
    opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert "momentum_buffer" not in opt.state[w]


def test_muon_groups_follow_the_roles():
    """OLMoE: attention and expert matrices on Muon; embedding, output, norms and the router on AdamW."""
    spec = get_train_spec("olmoe")
    model = spec.build_meta_model(spec.model_args("debugmodel"))
    groups = muon_groups(model, 0.1, excluded_roles(False, True))
    roles = {id(r.param): r.role for r in parameter_roles(model)}
    on_muon = {roles[id(p)] for g in groups if g["muon"] for p in g["params"]}
    on_adamw = {roles[id(p)] for g in groups if not g["muon"] for p in g["params"]}
    assert on_muon == {Role.MATRIX}
    assert on_adamw == {Role.EMBEDDING, Role.OUTPUT, Role.NORM, Role.ROUTER}
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert {roles[id(p)] for p in no_decay} == {Role.EMBEDDING}  # decay_embeddings = false


# ---------------------------------------------------------------- sharded: 2 processes, gloo
SHAPES = [(7, 5), (6, 9), (4, 6, 3), (5, 4)]  # rows split unevenly, columns split, stacked experts, replicated


def _worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_replicate", "dp_shard"))
        placements = [(Replicate(), Shard(0)), (Replicate(), Shard(1)), (Replicate(), Shard(0)),
                      (Replicate(), Replicate())]
        torch.manual_seed(0)
        full = [torch.randn(*s) for s in SHAPES] * 2  # 8 matrices: several rounds of one per rank
        grads = [[torch.randn(*s) for s in SHAPES] * 2 for _ in range(3)]
        pl = placements * 2
        ref = [nn.Parameter(t.clone()) for t in full]
        sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, p)) for t, p in zip(full, pl)]
        ref_opt = Muon([{"params": ref, "muon": True}], muon_defaults=_defaults(), lr=0.02, weight_decay=0.1)
        opt = Muon([{"params": sharded, "muon": True}], muon_defaults=_defaults(), lr=0.02, weight_decay=0.1)
        for step in range(3):
            for i in range(len(full)):
                ref[i].grad = grads[step][i].clone()
                sharded[i].grad = distribute_tensor(grads[step][i].clone(), mesh, pl[i])
            ref_opt.step()
            opt.step()
        for i, (a, b) in enumerate(zip(ref, sharded)):
            assert torch.equal(a.detach(), b.full_tensor()), f"matrix {i} {SHAPES[i % 4]} {pl[i]}"
        # Only the split matrices travelled: each rank sent its shards once and received its results once.
        assert opt.bytes_communicated > 0
        dist.barrier()  # neither rank tears its group down while the other's gloo threads still finish work
    finally:
        dist.destroy_process_group()


def test_sharded_matrices_step_exactly_as_whole_ones():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
