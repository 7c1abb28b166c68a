"""Parameter roles by module type (components/param_groups.py) on the debug models, and the groups built on them."""
from __future__ import annotations

import re

import pytest
import torch

from torchtitan.components.param_groups import Role, excluded_roles, parameter_roles, weight_decay_groups
from torchtitan.models import get_train_spec


def _model(name: str):
    spec = get_train_spec(name)
    return spec.build_meta_model(spec.model_args("debugmodel"))


def _roles(model) -> dict[str, set[str]]:
    """Role -> FQNs with the layer index replaced by N."""
    out: dict[str, set[str]] = {}
    for r in parameter_roles(model):
        out.setdefault(r.role.value, set()).add(re.sub(r"layers\.\d+\.", "layers.N.", r.fqn))
    return out


def _matrices(*names: str) -> set[str]:
    return {f"layers.N.{n}.weight" for n in names}


ATTN_MLP = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
            "feed_forward.w3")


def test_llama3_roles():
    assert _roles(_model("llama3")) == {
        "embedding": {"tok_embeddings.weight"},
        "norm": {"layers.N.attention_norm.weight", "layers.N.ffn_norm.weight", "norm.weight"},
        "output": {"output.weight"},
        "matrix": _matrices(*ATTN_MLP),
    }


def test_olmo2_roles():
    """QK-norms and the post-norms are norms (RMSNorm modules); no biases."""
    assert _roles(_model("olmo2")) == {
        "embedding": {"tok_embeddings.weight"},
        "norm": {"layers.N.attention.q_norm.weight", "layers.N.attention.k_norm.weight",
                 "layers.N.post_attention_norm.weight", "layers.N.post_ffn_norm.weight", "norm.weight"},
        "output": {"output.weight"},
        "matrix": _matrices(*ATTN_MLP),
    }


def test_biases_sinks_and_experts():
    """gpt-oss: Linear biases and the grouped experts' b1/b2/b3 are biases, the stacked expert weights matrices,
    the router's weight a router, the attention sinks neither."""
    roles = _roles(_model("gpt_oss"))
    assert roles["bias"] == {f"layers.N.attention.{w}.bias" for w in ("wq", "wk", "wv", "wo")} | {
        "layers.N.feed_forward.experts.b1", "layers.N.feed_forward.experts.b2", "layers.N.feed_forward.experts.b3",
        "layers.N.feed_forward.router.gate.bias"}
    assert "layers.N.feed_forward.experts.w1" in roles["matrix"]
    assert roles["router"] == {"layers.N.feed_forward.router.gate.weight"}  # Muon leaves it to AdamW
    assert roles["other"] == {"layers.N.attention.sinks"}


def test_tied_output_is_the_embedding_also_on_a_stage_of_its_own():
    """OLMo 1 debug ties embedding and output (and its LayerNorm has no parameters): one embedding parameter.
    A last pipeline stage holds only the output copy of the tied weight: it keeps the embedding's role."""
    model = _model("olmo")
    assert _roles(model) == {"embedding": {"tok_embeddings.weight"}, "matrix": _matrices(*ATTN_MLP)}
    model.tok_embeddings = None  # what a last stage keeps (distributed/pipeline.py build_stage_modules)
    assert _roles(model)["embedding"] == {"output.weight"}


@pytest.mark.parametrize("decay_embeddings,decay_norm_and_bias,no_decay", [
    (False, True, {Role.EMBEDDING}),
    (True, False, {Role.NORM, Role.BIAS}),
    (False, False, {Role.EMBEDDING, Role.NORM, Role.BIAS}),
])
def test_excluded_roles_land_in_the_zero_decay_group(decay_embeddings, decay_norm_and_bias, no_decay):
    model = _model("gpt_oss")
    excluded = excluded_roles(decay_embeddings, decay_norm_and_bias)
    assert excluded == no_decay
    decay, zero = weight_decay_groups(model, 0.1, excluded)
    assert decay["weight_decay"] == 0.1 and zero["weight_decay"] == 0.0
    role = {id(r.param): r.role for r in parameter_roles(model)}
    assert {role[id(p)] for p in zero["params"]} == no_decay
    assert not {role[id(p)] for p in decay["params"]} & no_decay
    assert len(decay["params"]) + len(zero["params"]) == len(list(model.parameters()))


def test_default_is_one_group_of_every_parameter_in_order():
    """Both flags on (or nothing to exclude, or no decay at all): the single group a parameter list makes."""
    model = _model("llama3")
    params = list(model.parameters())
    for excluded, decay in ((excluded_roles(True, True), 0.1), (excluded_roles(False, True), 0.0)):
        (group,) = weight_decay_groups(model, decay, excluded)
        assert group.keys() == {"params"} and all(a is b for a, b in zip(group["params"], params))
    # OLMo 1 has no norm weights and no biases: decay_norm_and_bias = false excludes nothing.
    assert len(weight_decay_groups(_model("olmo"), 0.1, excluded_roles(True, False))) == 1


def test_frozen_parameters_are_left_out():
    model = _model("llama3")
    model.tok_embeddings.weight.requires_grad_(False)
    groups = weight_decay_groups(model, 0.1, excluded_roles(False, True))
    assert len(groups) == 1 and all(p is not model.tok_embeddings.weight for p in groups[0]["params"])
    assert isinstance(groups[0]["params"][0], torch.nn.Parameter)
