"""The output layer fused into a chunked cross-entropy: same value and gradients, same checkpoint keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan.components.loss import (
    IGNORE_INDEX,
    FusedOutputLoss,
    OutputHead,
    build_loss_fn,
    cross_entropy_sum,
    fuse_output_into_loss,
    linear_cross_entropy_sum,
)
from torchtitan.config import ConfigError, load_config
from torchtitan.config.job_config import Training
from torchtitan.models import get_train_spec
from torchtitan.models.llama3 import llama3_flavors
from torchtitan.trainer.plan import make_plan


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[0, :5] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk,z", [(10, 0.0), (10, 1e-3), (74, 0.0), (1000, 1e-3)])
def test_value_and_gradients_equal_the_unfused_loss(chunk, z):
    h, w, labels = _data()
    want = cross_entropy_sum(F.linear(h, w), labels, z)
    want_grads = torch.autograd.grad(want, (h, w))
    got = linear_cross_entropy_sum(h, w, labels, chunk, z)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_match_the_unfused_bf16_path():
    """As under FSDP mixed precision: bf16 matmul, float32 cross-entropy, in both paths."""
    h, w, labels = _data(torch.bfloat16)
    want = cross_entropy_sum(F.linear(h, w), labels)
    got = linear_cross_entropy_sum(h, w, labels, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    gw_want, = torch.autograd.grad(want, w)
    gw_got, = torch.autograd.grad(got, w)
    torch.testing.assert_close(gw_got.float(), gw_want.float(), rtol=2e-2, atol=2e-2)


def test_head_keeps_the_parameter_name_and_the_model_returns_hidden_states():
    spec = get_train_spec("llama3")
    torch.manual_seed(0)
    model = spec.build_model(llama3_flavors["debugmodel"])
    model.init_weights()
    tokens = torch.randint(0, 2048, (2, 24))
    labels = torch.randint(0, 2048, (2, 24))
    keys, logits = list(model.state_dict()), model(tokens)
    want = cross_entropy_sum(logits, labels)

    fuse_output_into_loss(model)
    assert isinstance(model.output, OutputHead) and list(model.state_dict()) == keys
    loss_fn = build_loss_fn(Training(loss_chunk_size=20, fused_output_loss=True))
    with pytest.raises(RuntimeError, match="before its output head was bound"):
        loss_fn(model(tokens), labels)
    loss_fn.head = model.output
    hidden = model(tokens)
    assert hidden.shape == (2, 24, model.args.dim)
    torch.testing.assert_close(loss_fn(hidden, labels), want, rtol=1e-6, atol=1e-4)


def test_tied_output_stays_tied():
    from torchtitan.models.olmo import olmo_flavors

    spec = get_train_spec("olmo")
    args = next(a for a in olmo_flavors.values() if a.tie_word_embeddings)
    with torch.device("meta"):
        model = spec.build_model(args)
    fuse_output_into_loss(model)
    assert model.output.weight is model.tok_embeddings.weight


def test_loss_fn_is_the_fused_one_only_when_asked():
    assert isinstance(build_loss_fn(Training(loss_chunk_size=8, fused_output_loss=True)), FusedOutputLoss)
    assert not isinstance(build_loss_fn(Training(loss_chunk_size=8)), FusedOutputLoss)


@pytest.mark.parametrize("extra,message", [
    ([], "fused_output_loss needs training.loss_chunk_size > 0"),
    (["--training.loss_chunk_size", "64", "--parallelism.tensor_parallel_degree", "2",
      "--parallelism.disable_loss_parallel"],
     "fused_output_loss cannot run with tensor_parallel_degree > 1"),
])
def test_preflight_rejects_what_fusion_cannot_do(extra, message):
    cfg = load_config(["--training.fused_output_loss", *extra], env={})
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, 2)
