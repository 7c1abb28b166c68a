"""The MoE layer (models/common/moe.py) against hand-written references: routing, expert outputs, balance losses
and their gradients, activation checkpointing, the expert bias. In float64 on one process (layouts:
tests/integration/test_moe_parity.py; the expert-bias update: tests/unit/trainer/test_balance.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.moe_helpers import DIM, HIDDEN, E, K, tiny_moe
from torchtitan.models.common.layers import FeedForward
from torchtitan.models.common.moe import MoE, MoEArgs


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
    moe = tiny_moe(score_func, norm_topk_prob, expert_bias)
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
    moe = tiny_moe("sigmoid", expert_bias=True)
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
    moe = tiny_moe()
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
    moe = tiny_moe()
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
    moe = tiny_moe()
    moe.balance.load_balance_weight = moe.balance.z_loss_weight = 0.1
    x = torch.randn(16, DIM, dtype=torch.float64, requires_grad=True)
    moe(x).square().sum().backward()
    plain = (moe.balance.counts.clone(), moe.balance.load_balance_sum.clone(), moe.router.gate.weight.grad.clone())
    moe.balance.reset()
    moe.zero_grad()
    checkpoint(moe, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(moe.balance.counts, plain[0]) and torch.equal(moe.balance.load_balance_sum, plain[1])
    torch.testing.assert_close(moe.router.gate.weight.grad, plain[2], rtol=0, atol=0)
