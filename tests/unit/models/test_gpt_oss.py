"""gpt-oss against transformers' GptOssForCausalLM.

Tiny random models of transformers' own class, built to exercise what differs from our other families: non-zero
attention sinks, biases on q/k/v/o, a router with a bias, experts with biases and the clamped SwiGLU (inputs
large enough that the clamps bite), alternating windows shorter than the prompt and full layers, YaRN without
the ramp's truncation, head_dim apart from hidden_size / heads, GQA: imported, our fp32 logits are within 1e-5;
HF -> DCP -> HF is bitwise (the fused gate/up tensors split and fused back); transformers loads our export with
our logits; greedy scripts/generate.py equals transformers' greedy generate. The released config.json files are
the 20B and 120B flavors; their MXFP4 expert tensors import as transformers dequantizes them.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.hf_parity import (
    PROMPT,
    VOCAB,
    assert_export_loads_with_our_logits,
    assert_export_refused,
    assert_greedy_generate_matches,
    assert_round_trip_bitwise,
)
from tests.integration.checkpoint_helpers import script
from tests.reference import hf_tensors, import_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.models import get_train_spec
from torchtitan.models.gpt_oss import GptOssStateDictAdapter, gpt_oss_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")



def _perturb(model) -> None:
    """Sinks, biases and norms random and far from their init; router weights large (routing decided by margins
    above float rounding); expert weights large enough that the SwiGLU clamps (limit 7) are reached."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif "router" in name:
                p.normal_(0.0, 0.5)
            elif name.endswith(("bias", "_bias")):
                p.normal_(0.0, 0.2)
            elif "experts" in name:
                p.normal_(0.0, 0.4)


def make_hf(folder, seed: int = 0, **config):
    """A random tiny GptOssForCausalLM in fp32, saved to folder: 4 layers alternating a window of 8 and full
    attention, hidden 64, 4 heads of head_dim 24, 2 KV heads, 8 experts of width 32, top-2, YaRN x4 from 16."""
    cfg = transformers.GptOssConfig(**{
        "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 24, "num_local_experts": 8, "num_experts_per_tok": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 256, "sliding_window": 8,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0},
        "pad_token_id": None, "eos_token_id": None, "bos_token_id": None, **config})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).eval()
    _perturb(model)
    model.save_pretrained(str(folder))
    return model


def test_logits_equal_transformers_after_hf_import(tmp_path):
    hf = make_hf(tmp_path)
    info, ours = import_hf(tmp_path)
    a = info.args
    assert info.name == "gpt_oss" and a.attn_head_dim == 24 and a.kv_heads == 2 and a.sliding_window == 8
    assert [a.layer_attention(i) for i in range(4)] == ["sliding", "full"] * 2
    assert a.rope_scaling.factor == 4.0 and not a.rope_scaling.truncate and a.moe.num_experts == 8
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (ours(tokens) - ref).abs().max().item()
        assert diff <= 1e-5, diff
        # The clamps bite: some expert pre-activations (of the first layer's MoE input) pass the limit.
        seen = []
        hook = ours.layers["0"].feed_forward.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        ours(tokens)
        hook.remove()
        e = ours.layers["0"].feed_forward.experts
        pre = torch.einsum("btd,eid->ebti", seen[0], e.w3) + e.b3[:, None, None]
        assert (pre.abs() > a.moe.swiglu_limit).any()
        # What differs is in play: without sinks, or with the plain SwiGLU, the logits change.
        for change in (dict(attention_sinks=False), dict(moe=dataclasses.replace(a.moe, gate="swiglu"))):
            other = info.spec.build_model(dataclasses.replace(a, **change))
            other.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("sinks")},
                                  strict=False)
            assert (other.eval()(tokens) - ref).abs().max().item() > 1e-3, change


def test_sink_gradient_equals_transformers(tmp_path):
    """Sinks train: the blockwise kernel's sink gradient is transformers' autograd one, to float32 precision (both
    sides compute RoPE tables in float32 from frequencies rounded differently, so even in float64 the models
    differ by ~1e-6; the kernel's own gradient is checked exactly, in float64, in tests/unit/ops/test_blockwise.py
    and, over context-parallel ranks, tests/unit/distributed/test_context_parallel.py)."""
    hf = make_hf(tmp_path)
    _, ours = import_hf(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 24, VOCAB, generator=torch.Generator().manual_seed(3))
    (hf(tokens).logits * g).sum().backward()
    (ours(tokens) * g).sum().backward()
    for layer in range(4):
        want = hf.model.layers[layer].self_attn.sinks.grad
        got = ours.layers[str(layer)].attention.sinks.grad
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_hf_to_dcp_to_hf_is_bitwise_and_loads_in_transformers(tmp_path):
    src = tmp_path / "hf"
    hf = make_hf(src)
    back = assert_round_trip_bitwise(src, tmp_path, hf, [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "layer_types", "sliding_window",
        "rope_parameters", "num_local_experts", "num_experts_per_tok", "swiglu_limit", "attention_bias"], VOCAB)
    assert "model.layers.3.mlp.experts.gate_up_proj_bias" in back and "model.layers.0.self_attn.sinks" in back


def test_our_export_loads_in_transformers_with_our_logits(tmp_path):
    spec = get_train_spec("gpt_oss")
    args = dataclasses.replace(gpt_oss_flavors["debugmodel"], max_seq_len=256, rope_theta=54321.0)
    ours = spec.build_model(args)
    ours.init_weights(buffer_device="cpu", seed=3)
    _perturb(ours)
    ours.eval()
    assert_export_loads_with_our_logits(spec, args, ours, tmp_path, 48)  # past the window and YaRN's 32 positions


def test_greedy_generate_equals_transformers_from_hf_and_step_folders(tmp_path):
    hf = make_hf(tmp_path / "hf")
    assert_greedy_generate_matches(hf, tmp_path / "hf", tmp_path, PROMPT)


def _released(layers: int, experts: int) -> dict:
    """openai/gpt-oss-{20b,120b}'s config.json as released (transformers 4.55)."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2), "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": layers,
        "num_key_value_heads": 8, "num_local_experts": experts, "output_router_logits": False,
        "pad_token_id": 199999, "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                       "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }


@pytest.mark.parametrize("flavor,layers,experts,total,active", [("20B", 24, 32, 20.9, 3.6),
                                                                ("120B", 36, 128, 116.8, 5.1)])
def test_released_configs_are_their_flavors(flavor, layers, experts, total, active):
    """The released files' architecture; the parameter counts of the model cards (21B / 3.6B and 117B / 5.1B; the
    active counts leave out the embedding, not the unembedding)."""
    spec = get_train_spec("gpt_oss")
    released = _released(layers, experts)
    args = GptOssStateDictAdapter.args_from_hf_config(released)
    assert args == gpt_oss_flavors[flavor] and spec.matching_flavor(args) == flavor
    ours = GptOssStateDictAdapter(args).hf_config("bfloat16")
    skip = {"transformers_version", "quantization_config", "torch_dtype"}  # our export is not quantized
    assert {k: ours[k] for k in released if k not in skip} == {k: v for k, v in released.items() if k not in skip}
    model = spec.build_meta_model(args)
    assert model.num_params() / 1e9 == pytest.approx(total, rel=0.01)
    assert model.num_params(active=True, exclude_embedding=True) / 1e9 == pytest.approx(active, rel=0.03)


def test_mxfp4_experts_import_as_transformers_dequantizes_them(tmp_path):
    """A folder laid out as the released ones (experts as MXFP4 blocks and scales, quantization_config mxfp4):
    the import dequantizes them as transformers' own convert_moe_packed_tensors does, and the logits equal
    transformers' model holding those dequantized weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tmp_path / "hf"
    hf = make_hf(src)
    g = torch.Generator().manual_seed(5)
    sd = hf_tensors(src)
    with torch.no_grad():
        for layer in range(4):
            for name, rows, cols in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):  # (E, rows, cols/32, 16)
                key = f"model.layers.{layer}.mlp.experts.{name}"
                blocks = torch.randint(0, 256, (8, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
                scales = torch.randint(120, 126, (8, rows, cols // 32), dtype=torch.uint8, generator=g)
                dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                assert dense.shape == sd[key].shape
                getattr(hf.model.layers[layer].mlp.experts, name).copy_(dense)
                del sd[key]
                sd[key + "_blocks"], sd[key + "_scales"] = blocks, scales
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    save_file(sd, quantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (quantized / "config.json").write_text(json.dumps(config))
    _, ours = import_hf(quantized)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    p = script("convert_hf_to_dcp.py", quantized, tmp_path / "dcp")  # the converter reads it the same way
    assert p.returncode == 0, p.stderr[-3000:]
    with pytest.raises(CheckpointError, match=r"MXFP4 needs both"):
        GptOssStateDictAdapter(ours.args).from_hf({"model.layers.0.mlp.experts.down_proj_blocks": sd[
            "model.layers.0.mlp.experts.down_proj_blocks"]})


@pytest.mark.parametrize("changes,message", [
    (dict(attention_sinks=False), r"attention without biases or sinks"),
    (dict(tie_word_embeddings=True), r"tying"),
    (dict(moe=None), r"moe is None"),
], ids=["no-sinks", "tied", "dense"])
def test_export_refuses_what_gpt_oss_cannot_express(changes, message):
    assert_export_refused(GptOssStateDictAdapter(dataclasses.replace(gpt_oss_flavors["debugmodel"], **changes)),
                          message)
