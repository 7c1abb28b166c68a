"""Qwen3 and Qwen3-MoE against transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM.

Tiny random models of transformers' own classes, built to exercise what differs from our other families
(head_dim apart from hidden_size / heads, per-head QK-norm with perturbed weights, GQA, tied and untied
embeddings, dense layers among the MoE ones, renormalized and raw top-k weights): imported, our fp32 logits
are within 1e-5; HF -> DCP -> HF is bitwise; transformers loads our export with our logits; greedy
scripts/generate.py equals transformers' greedy generate from the HF folder and from its step folder.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.hf_parity import (
    PROMPT,
    VOCAB,
    assert_export_loads_with_our_logits,
    assert_export_refused,
    assert_greedy_generate_matches,
    assert_round_trip_bitwise,
)
from tests.reference import hf_tensors, import_hf, save_random_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.checkpoint.formats.hf import write_hf_folder
from torchtitan.models import get_train_spec
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import RopeScaling, YarnScaling
from torchtitan.models.qwen3 import Qwen3StateDictAdapter, qwen3_flavors
from torchtitan.models.qwen3_moe import Qwen3MoeStateDictAdapter, qwen3_moe_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Qwen/Qwen3-0.6B's config.json as released (transformers 4.51); the other sizes differ in the fields below.
RELEASED_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
# (hidden_size, intermediate_size, layers = max_window_layers, heads, tied) of the released dense sizes.
RELEASED_SIZES = {"0.6B": (1024, 3072, 28, 16, True), "1.7B": (2048, 6144, 28, 16, True),
                  "4B": (2560, 9728, 36, 32, True), "8B": (4096, 12288, 36, 32, False),
                  "14B": (5120, 17408, 40, 40, False), "32B": (5120, 25600, 64, 64, False)}
# Qwen/Qwen3-30B-A3B's config.json as released; 235B-A22B differs in the fields below.
RELEASED_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
RELEASED_235B = {**RELEASED_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
                 "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94}


def _released(flavor: str) -> dict:
    if flavor == "30B-A3B":
        return RELEASED_30B_A3B
    if flavor == "235B-A22B":
        return RELEASED_235B
    dim, inter, layers, heads, tied = RELEASED_SIZES[flavor]
    return {**RELEASED_0_6B, "hidden_size": dim, "intermediate_size": inter, "num_hidden_layers": layers,
            "max_window_layers": layers, "num_attention_heads": heads, "tie_word_embeddings": tied}


@pytest.mark.parametrize("flavor", [*RELEASED_SIZES, "30B-A3B", "235B-A22B"])
def test_released_config_is_its_flavor_and_exports_back(flavor):
    family = "qwen3" if flavor in RELEASED_SIZES else "qwen3_moe"
    spec, released = get_train_spec(family), _released(flavor)
    args = spec.state_dict_adapter.args_from_hf_config(released)
    assert args == spec.flavors[flavor] and spec.matching_flavor(args) == flavor
    ours = spec.adapter(args).hf_config("bfloat16")
    assert {k: ours[k] for k in released if k != "transformers_version"} == {
        k: v for k, v in released.items() if k != "transformers_version"}


def make_hf(family: str, folder, seed: int = 0, **config):
    """A random tiny Qwen3 (or Qwen3-MoE) in fp32, saved to folder: 3 layers, hidden 64, 4 heads of head_dim 32
    (twice hidden / heads), 2 KV heads; the MoE one has 8 experts of width 32, top-2, layer 1 dense."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=256,
                pad_token_id=None, eos_token_id=None, bos_token_id=None, initializer_range=0.1)
    if family == "qwen3":
        return save_random_hf(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**{**base, **config}),
                              folder, seed)
    base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                norm_topk_prob=True)
    model = save_random_hf(transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(**{**base, **config}),
                           folder, seed)
    with torch.no_grad():  # router logits far apart, so routing is decided by margins above float rounding
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    return model


HF_CASES = {
    "qwen3-untied": ("qwen3", dict(tie_word_embeddings=False)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3-yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                  "original_max_position_embeddings": 16})),
    "qwen3_moe-norm-topk": ("qwen3_moe", dict()),
    "qwen3_moe-raw-topk-step2": ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[])),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_equal_transformers_after_hf_import(tmp_path, case):
    family, config = HF_CASES[case]
    hf = make_hf(family, tmp_path, **config)
    info, ours = import_hf(tmp_path)
    assert info.name == family and info.args.attn_head_dim == 32 and info.args.kv_heads == 2
    assert info.args.qk_norm == "head"
    if family == "qwen3_moe":
        moe_layers = [i for i in range(3) if info.args.layer_is_moe(i)]
        assert moe_layers == ([0, 2] if "mlp_only_layers" not in config else [1])
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (ours(tokens) - ref).abs().max().item()
        assert diff <= 1e-5, diff
        # The per-head QK-norm weights matter: unit ones give other logits.
        for block in ours.layers.values():
            block.attention.q_norm.reset_parameters()
        assert (ours(tokens) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_hf_to_dcp_to_hf_is_bitwise_and_loads_in_transformers(tmp_path, family):
    src = tmp_path / "hf"
    hf = make_hf(family, src)
    keys = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "rope_parameters"]
    if family == "qwen3_moe":
        keys += ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step", "mlp_only_layers"]
    back = assert_round_trip_bitwise(src, tmp_path, hf, keys, VOCAB)
    if family == "qwen3_moe":
        assert "model.layers.2.mlp.experts.7.down_proj.weight" in back and "model.layers.1.mlp.up_proj.weight" in back


def _random_ours(family: str, args):
    spec = get_train_spec(family)
    model = spec.build_model(args)
    model.init_weights(buffer_device="cpu", seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "router" in name:
                p.normal_(0.0, 0.5)
    return spec, model.eval()


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("qwen3", False), ("qwen3_moe", False)])
def test_our_export_loads_in_transformers_with_our_logits(tmp_path, family, tied):
    flavors = qwen3_flavors if family == "qwen3" else qwen3_moe_flavors
    args = dataclasses.replace(flavors["debugmodel"], n_layers=3, max_seq_len=256, rope_theta=54321.0,
                               tie_word_embeddings=tied)
    spec, ours = _random_ours(family, args)
    assert_export_loads_with_our_logits(spec, args, ours, tmp_path, 48)
    assert ("lm_head.weight" in hf_tensors(tmp_path / "hf")) != tied


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_greedy_generate_equals_transformers_from_hf_and_step_folders(tmp_path, family):
    hf_dir = tmp_path / "hf"
    hf = make_hf(family, hf_dir, tie_word_embeddings=family == "qwen3")
    assert_greedy_generate_matches(hf, hf_dir, tmp_path, PROMPT)


@pytest.mark.parametrize("family,flavor", [("qwen3", f) for f in qwen3_flavors]
                         + [("qwen3_moe", f) for f in qwen3_moe_flavors if f != "debugmodel-dense"])
def test_flavors_round_trip_through_config_json(family, flavor):
    spec = get_train_spec(family)
    args = spec.flavors[flavor]
    cfg = json.loads(json.dumps(spec.adapter(args).hf_config("bfloat16")))
    assert cfg["head_dim"] == args.attn_head_dim and cfg["architectures"] == [spec.state_dict_adapter.hf_architecture]
    back = spec.state_dict_adapter.args_from_hf_config(cfg)
    assert back == args and spec.matching_flavor(back) == flavor


# Published sizes: (total, non-embedding or active) parameters in billions, as the model cards give them.
PUBLISHED = {("qwen3", "0.6B"): (0.6, 0.44), ("qwen3", "1.7B"): (1.7, 1.4), ("qwen3", "4B"): (4.0, 3.6),
             ("qwen3", "8B"): (8.2, 6.95), ("qwen3", "14B"): (14.8, 13.2), ("qwen3", "32B"): (32.8, 31.2),
             ("qwen3_moe", "30B-A3B"): (30.5, 3.3), ("qwen3_moe", "235B-A22B"): (235.0, 22.0)}


@pytest.mark.parametrize("family,flavor", list(PUBLISHED))
def test_flavor_sizes_are_the_published_ones(family, flavor):
    spec = get_train_spec(family)
    model = spec.build_meta_model(spec.flavors[flavor])
    total, second = PUBLISHED[(family, flavor)]
    assert model.num_params() / 1e9 == pytest.approx(total, rel=0.02)
    if family == "qwen3":
        # Non-embedding: without the embedding and, untied, without the output matrix either.
        emb = model.tok_embeddings.weight.numel() * (1 if model.is_tied else 2)
        assert (model.num_params() - emb) / 1e9 == pytest.approx(second, rel=0.02)
    else:
        assert model.num_params(active=True) / 1e9 == pytest.approx(second, rel=0.03)


EXPORT_REFUSALS = {
    "qwen3-width-qk-norm": ("qwen3", dict(qk_norm="width"), r"qk_norm = 'width' \(per-head only\)"),
    "qwen3-window": ("qwen3", dict(sliding_window=16), r"sliding_window = 16 \(full attention only\)"),
    "qwen3-llama-rope": ("qwen3", dict(rope_scaling=RopeScaling()), r"rope_scaling is not yarn"),
    "qwen3-experts": ("qwen3", dict(moe=MoEArgs()), r"a mixture of experts is qwen3_moe's"),
    "moe-shared": ("qwen3_moe", dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=128, shared_expert_hidden_dim=64)),
                   r"moe\.shared_expert_hidden_dim = 64 \(no shared expert\)"),
    "moe-sigmoid": ("qwen3_moe", dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=128, score_func="sigmoid")),
                    r"moe\.score_func = 'sigmoid'"),
    "moe-leading-dense": ("qwen3_moe", dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=128, n_dense_layers=1)),
                          r"give dense layers as moe\.dense_layer_ids"),
    "moe-dense": ("qwen3_moe", dict(moe=None), r"a dense model is qwen3's"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_what_the_hf_class_cannot_express(tmp_path, case):
    family, changes, message = EXPORT_REFUSALS[case]
    spec = get_train_spec(family)
    args = dataclasses.replace(spec.flavors["debugmodel"], **changes)
    adapter = spec.adapter(args)
    assert_export_refused(adapter, message)
    with torch.device("meta"):
        native = spec.build_model(args).state_dict()
    with pytest.raises(CheckpointError, match=message):
        adapter.to_hf(native)
    with pytest.raises(CheckpointError, match=message):
        write_hf_folder(native, adapter, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_import_refuses_what_the_model_cannot_compute():
    cfg = Qwen3StateDictAdapter(qwen3_flavors["0.6B"]).hf_config()
    for changes, message in (
            (dict(use_sliding_window=True), r"use_sliding_window is true"),
            (dict(layer_types=["sliding_attention"] * 28), r"layer_types has \['sliding_attention'\]"),
            (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_scaling=None), r"'linear'"),
            (dict(attention_bias=True), r"biases are not supported")):
        with pytest.raises(CheckpointError, match=message):
            Qwen3StateDictAdapter.args_from_hf_config({**cfg, **changes}, "ckpt/config.json")
    moe_cfg = Qwen3MoeStateDictAdapter(qwen3_moe_flavors["30B-A3B"]).hf_config()
    with pytest.raises(CheckpointError, match=r"bad or missing expert field"):
        Qwen3MoeStateDictAdapter.args_from_hf_config({**moe_cfg, "mlp_only_layers": "none"}, "ckpt/config.json")
    # Qwen3Config's head_dim default is 128 (not hidden / heads); Qwen3MoeConfig has none (hidden / heads).
    no_head_dim = {k: v for k, v in cfg.items() if k != "head_dim"}
    assert Qwen3StateDictAdapter.args_from_hf_config(no_head_dim).attn_head_dim == 128
    no_head_dim = {k: v for k, v in moe_cfg.items() if k != "head_dim"}
    assert Qwen3MoeStateDictAdapter.args_from_hf_config(no_head_dim).attn_head_dim == 2048 // 32


def test_yarn_export_round_trips():
    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=32768)
    args = dataclasses.replace(qwen3_flavors["8B"], rope_scaling=yarn, max_seq_len=131072)
    cfg = json.loads(json.dumps(Qwen3StateDictAdapter(args).hf_config()))
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 4.0
    assert Qwen3StateDictAdapter.args_from_hf_config(cfg) == args
