"""The MoE layer against hand-written references: routing, expert outputs, balance losses and their gradients,
activation checkpointing, the expert bias. In float64 on one process (layouts: tests/integration/test_moe_parity.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from torchtitan.config.job_config import MoETraining, Parallelism
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.common.layers import FeedForward
from torchtitan.models.common.moe import MoE, MoEArgs
from torchtitan.tools.errors import ConfigError
from torchtitan.trainer.balance import ExpertBalance

DIM, E, K, HIDDEN = 12, 6, 2, 10


def _moe(score_func: str = "softmax", norm_topk_prob: bool = False, expert_bias: bool = False) -> MoE:
    torch.manual_seed(0)
    moe = MoE(DIM, MoEArgs(num_experts=E, top_k=K, hidden_dim=HIDDEN, score_func=score_func,
                           norm_topk_prob=norm_topk_prob, expert_bias=expert_bias)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return moe


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over the chosen experts of weight x SwiGLU_e(x)."""
    scores = torch.softmax(x @ moe.router.gate.weight.T, -1) if moe.router.score_func == "softmax" else \
        torch.sigmoid(x @ moe.router.gate.weight.T)
    bias = moe.router.expert_bias if moe.router.expert_bias is not None else torch.zeros(E, dtype=x.dtype)
    out = torch.zeros_like(x)
    w = moe.experts
    for t in range(x.shape[0]):
        chosen = torch.topk(scores[t] + bias, K).indices
        weights = scores[t, chosen]
        if moe.router.norm_topk_prob:
            weights = weights / weights.sum()
        for e, wt in zip(chosen.tolist(), weights):
            h = torch.nn.functional.silu(w.w1[e] @ x[t]) * (w.w3[e] @ x[t])
            out[t] += wt * (w.w2[e] @ h)
    return out


@pytest.mark.parametrize("score_func,norm_topk_prob,expert_bias",
                         [("softmax", False, False), ("softmax", True, False), ("sigmoid", True, True)])
def test_output_equals_token_by_token_reference(score_func, norm_topk_prob, expert_bias):
    moe = _moe(score_func, norm_topk_prob, expert_bias)
    if expert_bias:
        moe.router.expert_bias = torch.linspace(-0.3, 0.3, E, dtype=torch.float64)  # changes the choice
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x)
    torch.testing.assert_close(got, _reference(moe, x.reshape(-1, DIM)).view_as(x), rtol=0, atol=1e-12)


def test_shared_expert_adds_a_dense_swiglu_for_every_token():
    torch.manual_seed(0)
    args = MoEArgs(num_experts=E, top_k=K, hidden_dim=HIDDEN, shared_expert_hidden_dim=7)
    moe = MoE(DIM, args, FeedForward(DIM, 7)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.4)
    x = torch.randn(11, DIM, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x)
        want = _reference(moe, x) + moe.shared_expert(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert len(moe.projections()["w1"]) == 2  # init draws the shared expert with the experts


def test_expert_bias_moves_the_choice_not_the_weights():
    moe = _moe("sigmoid", expert_bias=True)
    x = torch.randn(32, DIM, dtype=torch.float64)
    _, scores, plain, _ = moe.router(x)
    moe.router.expert_bias = torch.zeros(E, dtype=torch.float64)
    moe.router.expert_bias[0] = 10.0  # expert 0 wins every token
    _, _, biased, weights = moe.router(x)
    assert (biased == 0).any(-1).all() and not (plain == 0).any(-1).all()
    torch.testing.assert_close(weights, scores.gather(1, biased))  # the weights are the unbiased scores


def _explicit_aux(moe: MoE, x: torch.Tensor, lb_weight: float, z_weight: float, n_tokens: float,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    logits = x @ moe.router.gate.weight.T
    probs = torch.softmax(logits, -1)
    if counts is None:
        counts = torch.bincount(torch.topk(probs, K).indices.flatten(), minlength=E).double()
    f = counts / counts.sum()
    lb = E * (f * probs.sum(0)).sum() / n_tokens
    z = torch.logsumexp(logits, -1).square().sum() / n_tokens
    return lb_weight * lb + z_weight * z


@pytest.mark.parametrize("fixed_counts", [False, True])
def test_balance_loss_gradients_equal_the_explicit_losses(fixed_counts):
    """The aux losses reach the router through AuxLoss's backward exactly as if added to the loss; with fixed
    counts (the routing pass) f comes from them, P from this micro-batch, both over the global token count."""
    moe = _moe()
    x = torch.randn(20, DIM, dtype=torch.float64)
    st = moe.balance
    st.load_balance_weight, st.z_loss_weight, st.n_tokens, st.grad_scale = 0.3, 0.05, 80.0, 2.0
    counts = torch.tensor([9.0, 1, 0, 20, 5, 5], dtype=torch.float64) if fixed_counts else None
    st.fixed_counts = counts
    (moe(x).sum() * 0).backward()  # only the aux losses' gradient
    got = moe.router.gate.weight.grad.clone()
    moe.zero_grad()
    (2.0 * _explicit_aux(moe, x, 0.3, 0.05, 80.0, counts)).backward()
    torch.testing.assert_close(got, moe.router.gate.weight.grad, rtol=1e-12, atol=1e-14)
    assert got.abs().max() > 1e-4
    # Logged values: this rank's unweighted shares.
    torch.testing.assert_close(st.z_loss_sum, _explicit_aux(moe, x, 0.0, 1.0, 80.0).detach())


def test_no_aux_loss_without_gradients_or_while_recording():
    moe = _moe()
    moe.balance.load_balance_weight = 1.0
    x = torch.randn(10, DIM, dtype=torch.float64)
    with torch.no_grad():
        moe(x)  # validation: nothing counted, nothing added
    assert moe.balance.counts is None and moe.balance.load_balance_sum is None
    moe.balance.recording = True
    with torch.no_grad():
        moe(x)
    assert moe.balance.counts.sum() == 10 * K and moe.balance.load_balance_sum is None


def test_activation_checkpointing_counts_each_token_once():
    moe = _moe()
    moe.balance.load_balance_weight = moe.balance.z_loss_weight = 0.1
    x = torch.randn(16, DIM, dtype=torch.float64, requires_grad=True)
    moe(x).square().sum().backward()
    plain = (moe.balance.counts.clone(), moe.balance.load_balance_sum.clone(), moe.router.gate.weight.grad.clone())
    moe.balance.reset()
    moe.zero_grad()
    checkpoint(moe, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(moe.balance.counts, plain[0]) and torch.equal(moe.balance.load_balance_sum, plain[1])
    torch.testing.assert_close(moe.router.gate.weight.grad, plain[2], rtol=0, atol=0)


def test_expert_bias_update_moves_load_toward_balance_unless_skipped():
    moe = _moe("sigmoid", expert_bias=True)
    moe.router.expert_bias = torch.zeros(E, dtype=torch.float32)
    dims = ParallelDims.from_config(Parallelism(), 1)
    balance = ExpertBalance([torch.nn.ModuleDict({"moe": moe})], MoETraining(expert_bias_update_rate=0.01), dims,
                            global_tokens=40, device=torch.device("cpu"))
    balance.begin_step(None)
    moe(torch.randn(40, DIM, dtype=torch.float64))
    counts = moe.balance.counts.clone()
    balance.end_step(torch.tensor(True))
    assert torch.equal(moe.router.expert_bias, torch.zeros(E))  # a skipped step leaves the bias
    balance.end_step(torch.tensor(False))
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.router.expert_bias, expected.float())
    metrics = balance.metrics()
    assert metrics["expert_imbalance"] == round((counts.max() / counts.mean()).item(), 4)


@pytest.mark.parametrize("ep,cp,shard,ok", [(2, 1, 4, True), (4, 2, 4, True), (3, 1, 4, False), (2, 4, 2, False),
                                             (8, 1, 4, False)])
def test_expert_parallel_degree_is_validated(ep, cp, shard, ok):
    p = Parallelism(expert_parallel_degree=ep, context_parallel_degree=cp, data_parallel_shard_degree=shard)
    if ok:
        assert ParallelDims.from_config(p, shard * cp).ep == ep
    else:
        with pytest.raises(ConfigError, match="expert_parallel_degree"):
            ParallelDims.from_config(p, shard * cp)


def test_a_dense_family_takes_experts():
    """The MoE layer is a decoder option: Llama 3 with experts in every layer but the first trains, and its HF
    export is refused by name (transformers' Llama has no experts)."""
    import dataclasses

    from torchtitan.models.common.decoder import Decoder
    from torchtitan.models.llama3 import Llama3StateDictAdapter, llama3_flavors
    from torchtitan.tools.errors import CheckpointError

    args = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=3,
                               moe=MoEArgs(num_experts=4, top_k=2, hidden_dim=64, n_dense_layers=1))
    torch.manual_seed(0)
    model = Decoder(args)
    model.init_weights(seed=0)
    kinds = [type(b.feed_forward).__name__ for b in model.layers.values()]
    assert kinds == ["FeedForward", "MoE", "MoE"]
    model(torch.randint(0, args.vocab_size, (2, 16))).float().logsumexp(-1).mean().backward()
    assert model.layers["2"].feed_forward.experts.w1.grad.abs().sum() > 0
    assert model.num_params(active=True) < model.num_params()
    with pytest.raises(CheckpointError, match="no mixture-of-experts"):
        Llama3StateDictAdapter(args).check_expressible()


@pytest.mark.parametrize("extra,message", [
    (["--model.name", "llama3", "--moe.router_z_loss_weight", "0.01"], "llama3 debugmodel is a dense model"),
    (["--moe.expert_bias_update_rate", "0.01"], "has no expert bias"),
    (["--moe.load_balance_loss_weight", "0", "--moe.load_balance_scope", "micro_batch"],
     "needs moe.load_balance_loss_weight > 0"),
])
def test_moe_options_without_effect_are_one_line_errors(extra, message):
    import os

    from torchtitan.config import load_config
    from torchtitan.trainer.plan import make_plan

    config = os.path.join(os.path.dirname(__file__), "..", "..", "..", "train_configs", "olmoe_debug.toml")
    make_plan(load_config(["--job.config_file", config], env={}), 1)
    # The file's [moe] keys under a dense flavor picked on the command line pass (the benchmark's comparator).
    make_plan(load_config(["--job.config_file", config, "--model.flavor", "debugmodel-dense"], env={}), 1)
    with pytest.raises(ConfigError, match=message):
        make_plan(load_config(["--job.config_file", config, *extra], env={}), 1)
