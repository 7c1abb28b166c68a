"""build_optimizers with weight decay by parameter role: the update, torch's two-group AdamW, state dicts, logs,
and FSDP2 (DTensor) parameters."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from tests.launch import ROOT
from torchtitan.components.loss import cross_entropy_sum
from torchtitan.components.optimizer import build_optimizers, muon_ns_dtype
from torchtitan.config.job_config import Optimizer
from torchtitan.models import get_train_spec

LR, WD = 1e-2, 0.1


def _model(name: str = "llama3", seed: int = 0):
    spec = get_train_spec(name)
    args = spec.model_args("debugmodel")
    args.n_layers, args.max_seq_len = 2, 16
    torch.manual_seed(seed)
    model = spec.build_model(args)
    model.init_weights()
    return model


def _backward(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=g)
    cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]).backward()


def test_no_embedding_decay_leaves_the_embedding_while_matrices_and_norms_decay():
    """Zero gradients: Adam's update is 0, so a step is the decay alone, w <- w (1 - lr wd), except on the
    embedding (decay_embeddings = false)."""
    model = _model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opts = build_optimizers([model], Optimizer(lr=LR, weight_decay=WD, decay_embeddings=False), "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opts.step()
    for name, p in model.named_parameters():
        want = before[name] if name == "tok_embeddings.weight" else before[name] * (1 - LR * WD)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=name)
    assert not torch.equal(model.layers["0"].attention.wq.weight, before["layers.0.attention.wq.weight"])


def test_equals_a_hand_built_two_group_adamw():
    """decay_embeddings = false, decay_norm_and_bias = false is torch's AdamW with the embedding, norms and
    biases in a group of weight_decay 0: same weights after three steps."""
    ours, ref = _model(), _model()
    opts = build_optimizers([ours], Optimizer(lr=LR, weight_decay=WD, decay_embeddings=False,
                                              decay_norm_and_bias=False, implementation="for-loop"), "cpu")
    no_decay = {"tok_embeddings.weight", "norm.weight"} | {n for n, _ in ref.named_parameters() if "_norm." in n}
    torch_adamw = torch.optim.AdamW(
        [{"params": [p for n, p in ref.named_parameters() if n not in no_decay]},
         {"params": [p for n, p in ref.named_parameters() if n in no_decay], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, foreach=False)
    for step in range(3):
        for model, opt in ((ours, opts), (ref, torch_adamw)):
            _backward(model, step)
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    assert [g["weight_decay"] for g in opts.param_groups] == [WD, 0.0]


def test_state_dict_round_trip_and_resume_keeps_the_configs_decay(caplog):
    """Two groups save and load through the flattened (per-FQN) optimizer state dict. Loading a state saved with
    another grouping keeps this run's weight decay per group (the checkpoint's would take the first parameter's)."""
    model = _model()
    with caplog.at_level(logging.INFO, logger="torchtitan"):
        two = build_optimizers([model], Optimizer(lr=LR, weight_decay=WD, decay_embeddings=False), "cpu")
    assert "none on 1 tensors (" in caplog.text and "parameters: embedding)" in caplog.text
    _backward(model, 0)
    two.step()
    two.zero_grad()  # as after every training step: a load initializes fresh optimizer state only without grads
    state = two.state_dict()
    assert state["state.tok_embeddings.weight.exp_avg"].abs().sum() > 0
    assert state["param_groups.tok_embeddings.weight.weight_decay"] == 0.0
    assert state["param_groups.output.weight.weight_decay"] == WD

    again = build_optimizers([model], Optimizer(lr=LR, weight_decay=WD, decay_embeddings=False), "cpu")
    again.load_state_dict(state)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k], k

    one = build_optimizers([model], Optimizer(lr=LR, weight_decay=WD), "cpu")  # one group; first param: embedding
    one.load_state_dict(state)
    assert [g["weight_decay"] for g in one.param_groups] == [WD]
    two.load_state_dict(one.state_dict())
    assert [g["weight_decay"] for g in two.param_groups] == [WD, 0.0]



def test_muon_ns_dtype_auto_is_bfloat16_on_cuda_float32_elsewhere_and_the_run_keeps_its_own_on_resume(caplog):
    """auto resolves by device (CPUs without bfloat16 matmul units run Newton-Schulz ~60x slower in it); a
    checkpoint written with another Newton-Schulz dtype resumes with this run's."""
    assert muon_ns_dtype("auto", "cuda") == "bfloat16" and muon_ns_dtype("auto", "cpu") == "float32"
    assert muon_ns_dtype("bfloat16", "cpu") == "bfloat16" and muon_ns_dtype("float32", "cuda") == "float32"
    model = _model()
    bf16 = build_optimizers([model], Optimizer(name="Muon", lr=LR, muon_ns_dtype="bfloat16"), "cpu")
    _backward(model, 0)
    bf16.step()
    bf16.zero_grad()
    state = bf16.state_dict()
    assert state["param_groups.layers.0.attention.wq.weight.ns_dtype"] == "bfloat16"
    with caplog.at_level(logging.INFO, logger="torchtitan"):
        auto = build_optimizers([model], Optimizer(name="Muon", lr=LR), "cpu")
    assert "; Newton-Schulz in float32" in caplog.text
    assert {g["ns_dtype"] for g in auto.param_groups if g["muon"]} == {"float32"}
    auto.load_state_dict(state)
    assert {g["ns_dtype"] for g in auto.param_groups if g["muon"]} == {"float32"}
    momentum = "state.layers.0.attention.wq.weight.momentum_buffer"
    assert torch.equal(auto.state_dict()[momentum], state[momentum])

_FSDP = """
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.components.optimizer import build_optimizers, muon_ns_dtype
from torchtitan.config.job_config import Optimizer
from torchtitan.models import get_train_spec
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
spec = get_train_spec("olmo2")
args = spec.model_args("debugmodel")
args.n_layers = 2
torch.manual_seed(0)
model = spec.build_model(args)
model.init_weights()
mesh = init_device_mesh("cpu", (1,))
for block in model.layers.values():
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
assert isinstance(model.tok_embeddings.weight, DTensor)
opts = build_optimizers([model], Optimizer(lr=1e-2, decay_embeddings=False), "cpu")
(no_decay,) = [g for g in opts.param_groups if g["weight_decay"] == 0.0]
assert [p is model.tok_embeddings.weight for p in no_decay["params"]] == [True]
emb = model.tok_embeddings.weight.detach().full_tensor().clone()
for p in model.parameters():
    p.grad = torch.zeros_like(p)
opts.step()
assert torch.equal(model.tok_embeddings.weight.full_tensor(), emb)
sd = opts.state_dict()
assert sd["param_groups.tok_embeddings.weight.weight_decay"] == 0.0
opts.load_state_dict(sd)
dist.destroy_process_group()
print("ok")
"""


def test_fsdp2_dtensor_parameters():
    """FSDP2 (one gloo rank, a subprocess): roles read off DTensor parameters, the step and the state dict."""
    proc = subprocess.run([sys.executable, "-c", _FSDP], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
