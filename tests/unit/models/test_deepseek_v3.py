"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Tiny random models of transformers' own class, built to exercise what differs from our other families: latent
attention with and without the query bottleneck, a q/k head dim (nope + RoPE) apart from the value head dim,
YaRN with its softmax mscale, sigmoid routing with a non-zero expert bias and node-limited groups, routed
weights scaled, a shared expert, a leading dense layer, perturbed norms: imported, our fp32 logits are within
1e-5; HF -> DCP -> HF is bitwise; transformers loads our export with our logits; greedy scripts/generate.py
equals transformers' greedy generate. The released config.json (DeepSeek-V3 671B; Moonlight-16B-A3B) is its
flavor; FP8 block scales are refused by name.
"""
from __future__ import annotations

import dataclasses

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
from tests.reference import import_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.models import get_train_spec
from torchtitan.models.deepseek_v3 import DeepseekV3StateDictAdapter, deepseek_v3_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")



def _perturb(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith(("gate.weight", "router.gate.weight")) and p.ndim == 2 and p.shape[0] == 8:
                p.normal_(0.0, 0.5)  # routing decided by margins above float rounding
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(7)) * 0.05)


def make_hf(folder, seed: int = 0, **config):
    """A random tiny DeepseekV3ForCausalLM in fp32: 3 layers (the first dense), hidden 64, 4 heads, q_lora 32,
    kv_lora 16, q/k head 16 + 8 (RoPE), value head 12, 8 experts of width 32 in 4 groups (top-2 groups, top-2
    experts), one shared expert, routed x2.5, YaRN x4 from 16 positions with mscale 1."""
    cfg = transformers.DeepseekV3Config(**{
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "rope_theta": 10000.0},
        "pad_token_id": None, "eos_token_id": None, "bos_token_id": None, "initializer_range": 0.1, **config})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    _perturb(model)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("config", [dict(), dict(q_lora_rank=None, n_group=1, topk_group=1)],
                         ids=["q-lora-groups", "direct-q"])
def test_logits_equal_transformers_after_hf_import(tmp_path, config):
    hf = make_hf(tmp_path, **config)
    info, ours = import_hf(tmp_path)
    a = info.args
    assert info.name == "deepseek_v3" and a.mla.qk_head_dim == 24 and a.mla.v_head_dim == 12
    assert a.moe.expert_bias and a.moe.n_dense_layers == 1 and a.moe.route_scale == 2.5
    assert ours.layers["1"].feed_forward.router.expert_bias.abs().max() > 0  # the file's e_score_correction_bias
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (ours(tokens) - ref).abs().max().item()
        assert diff <= 1e-5, diff
        # The expert bias and the groups are in play: without them the logits differ.
        for change in (dict(expert_bias=False), dict(n_group=1, topk_group=1)):
            if a.moe.n_group == 1 and "n_group" in change:
                continue
            other = info.spec.build_model(dataclasses.replace(a, moe=dataclasses.replace(a.moe, **change)))
            other.load_state_dict(ours.state_dict(), strict=False)
            assert (other.eval()(tokens) - ref).abs().max().item() > 1e-4, change


def test_hf_to_dcp_to_hf_is_bitwise_and_loads_in_transformers(tmp_path):
    src = tmp_path / "hf"
    hf = make_hf(src)
    back = assert_round_trip_bitwise(src, tmp_path, hf, [
        "model_type", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_group", "topk_group", "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor",
        "rope_parameters", "vocab_size", "rms_norm_eps"], VOCAB)
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in back
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in back


def test_our_export_loads_in_transformers_with_our_logits(tmp_path):
    spec = get_train_spec("deepseek_v3")
    args = dataclasses.replace(deepseek_v3_flavors["debugmodel"], max_seq_len=256, rope_theta=54321.0)
    ours = spec.build_model(args)
    ours.init_weights(buffer_device="cpu", seed=3)
    _perturb(ours)
    ours.eval()
    assert_export_loads_with_our_logits(spec, args, ours, tmp_path, 48)


def test_greedy_generate_equals_transformers_from_hf_and_step_folders(tmp_path):
    hf = make_hf(tmp_path / "hf")
    assert_greedy_generate_matches(hf, tmp_path / "hf", tmp_path, PROMPT)


# deepseek-ai/DeepSeek-V3's config.json as released (the architecture; auto_map and the FP8 quantization_config
# as in the file).
RELEASED_671B = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "bos_token_id": 0, "eos_token_id": 1,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# moonshotai/Moonlight-16B-A3B-Instruct's config.json (the architecture fields).
RELEASED_MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 11264, "kv_lora_rank": 512, "max_position_embeddings": 8192,
    "model_type": "deepseek_v3", "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "num_nextn_predict_layers": 0, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 163840,
}


@pytest.mark.parametrize("flavor,released,total,active", [("671B", RELEASED_671B, 671.0, 37.0),
                                                          ("16B-A3B", RELEASED_MOONLIGHT, 16.0, 3.0)])
def test_released_configs_are_their_flavors(flavor, released, total, active):
    """DeepSeek-V3's 671B total / 37B active (its MTP layer, 14B more, left out) and Moonlight's 16B / 3B."""
    spec = get_train_spec("deepseek_v3")
    args = DeepseekV3StateDictAdapter.args_from_hf_config(released)
    assert args == deepseek_v3_flavors[flavor] and spec.matching_flavor(args) == flavor
    model = spec.build_meta_model(args)
    assert model.num_params() / 1e9 == pytest.approx(total, rel=0.01)
    assert model.num_params(active=True) / 1e9 == pytest.approx(active, rel=0.03)


def test_fp8_block_scales_are_refused_by_name():
    adapter = DeepseekV3StateDictAdapter(deepseek_v3_flavors["debugmodel"])
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' is an FP8 block scale"):
        adapter.native_key("model.layers.0.self_attn.q_a_proj.weight_scale_inv")


@pytest.mark.parametrize("changes,message", [
    (dict(moe=None), r"moe is None"),
    (dict(tie_word_embeddings=True), r"tying"),
    (dict(sliding_window=16), r"sliding_window"),
], ids=["dense", "tied", "window"])
def test_export_refuses_what_deepseek_v3_cannot_express(changes, message):
    assert_export_refused(DeepseekV3StateDictAdapter(dataclasses.replace(deepseek_v3_flavors["debugmodel"],
                                                                          **changes)), message)
