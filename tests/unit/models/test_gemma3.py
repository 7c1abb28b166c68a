"""Gemma 3 (text) against transformers' Gemma3ForCausalLM.

Tiny random models of transformers' own class, built to exercise what differs from our other families: windows
shorter than the prompt on five of six layers with their own RoPE theta, linear RoPE scaling on the global
layers, head_dim apart from hidden_size / heads, query_pre_attn_scalar apart from head_dim, GQA, every (1 + w)
norm perturbed (the four per block, the per-head QK-norms, the final one), embeddings scaled by sqrt(dim):
imported, our fp32 logits are within 1e-5; HF -> DCP -> HF is bitwise; transformers loads our export with our
logits; greedy scripts/generate.py equals transformers' greedy generate. The released config.json files (the
1B's, the multimodal 4B/12B/27B's text_config) import as their flavors, and a multimodal folder's text model
imports.
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
from tests.reference import import_hf, save_random_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.checkpoint.formats.hf import write_hf_folder
from torchtitan.models import get_train_spec
from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.gemma3 import Gemma3StateDictAdapter, gemma3_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")



def make_hf(folder, seed: int = 0, **config):
    """A random tiny Gemma3ForCausalLM in fp32, saved to folder: 6 layers (window 8 on layers 0-4), hidden 64,
    4 heads of head_dim 24, 2 KV heads, query_pre_attn_scalar 40, linear RoPE x4 on the global layer; every norm
    weight random around zero (the (1 + w) scale around one)."""
    cfg = transformers.Gemma3TextConfig(**{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 24, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "sliding_window": 8, "query_pre_attn_scalar": 40, "pad_token_id": None, "eos_token_id": None,
        "bos_token_id": None, "initializer_range": 0.1,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **config})
    return save_random_hf(transformers.Gemma3ForCausalLM, cfg, folder, seed, norm_mean=0.0)


def test_logits_equal_transformers_after_hf_import(tmp_path):
    hf = make_hf(tmp_path)
    info, ours = import_hf(tmp_path)
    a = info.args
    assert info.name == "gemma3" and a.attn_head_dim == 24 and a.kv_heads == 2 and a.query_pre_attn_scalar == 40
    assert [a.layer_attention(i) for i in range(6)] == ["sliding"] * 5 + ["full"] and a.sliding_window == 8
    assert (a.rope_theta, a.rope_local_theta, a.rope_scaling.factor) == (1e6, 1e4, 4.0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (ours(tokens) - ref).abs().max().item()
        assert diff <= 1e-5, diff
        # What differs is in play: each of these changes the logits.
        for change in (dict(query_pre_attn_scalar=None), dict(sliding_window=None, attention_pattern=()),
                       dict(rope_local_theta=None), dict(scale_embeddings=False)):
            other = info.spec.build_model(dataclasses.replace(a, **change))
            other.load_state_dict(ours.state_dict())
            assert (other.eval()(tokens) - ref).abs().max().item() > 1e-3, change


def test_hf_to_dcp_to_hf_is_bitwise_and_loads_in_transformers(tmp_path):
    src = tmp_path / "hf"
    hf = make_hf(src)
    back = assert_round_trip_bitwise(src, tmp_path, hf, [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar",
        "hidden_activation"], VOCAB)
    assert "lm_head.weight" not in back and "model.layers.5.pre_feedforward_layernorm.weight" in back


def test_our_export_loads_in_transformers_with_our_logits(tmp_path):
    spec = get_train_spec("gemma3")
    args = dataclasses.replace(gemma3_flavors["debugmodel"], max_seq_len=256, rope_theta=54321.0)
    ours = spec.build_model(args)
    ours.init_weights(buffer_device="cpu", seed=3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    ours.eval()
    assert_export_loads_with_our_logits(spec, args, ours, tmp_path, 80)  # past the 32-token window


def test_greedy_generate_equals_transformers_from_hf_and_step_folders(tmp_path):
    hf = make_hf(tmp_path / "hf")
    assert_greedy_generate_matches(hf, tmp_path / "hf", tmp_path, PROMPT)


def test_a_multimodal_folder_imports_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (the 4B-27B releases' layout: the text model under language_model.,
    a vision tower and projector beside it): our import is its text model, logits within 1e-5 of transformers'
    on text-only input, and the export is a Gemma3ForCausalLM of the same weights."""
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=8,
                query_pre_attn_scalar=40, rope_scaling={"rope_type": "linear", "factor": 4.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and "language_model" in name:
                p.normal_(0.0, 0.1)
    hf.save_pretrained(str(tmp_path / "mm"))
    info, ours = import_hf(tmp_path / "mm")
    assert info.name == "gemma3" and info.args.rope_scaling.factor == 4.0 and info.args.attn_head_dim == 24
    tokens = torch.randint(0, VOCAB - 4, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    write_hf_folder(ours.state_dict(), info.spec.adapter(info.args), str(tmp_path / "text"))
    text_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "text"),
                                                                   attn_implementation="eager").eval()
    assert type(text_model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert (text_model(tokens).logits - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5


# google/gemma-3-1b-pt's config.json as released (transformers 4.50).
RELEASED_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
# The text_config of the multimodal google/gemma-3-{4b,12b,27b}-pt releases as their files give it (the rest
# is Gemma3TextConfig's defaults).
RELEASED_TEXT_CONFIGS = {
    "4B": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
    "12B": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
            "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024},
    "27B": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
            "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
            "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024},
}


@pytest.mark.parametrize("flavor", ["1B", *RELEASED_TEXT_CONFIGS])
def test_released_configs_are_their_flavors(flavor):
    spec = get_train_spec("gemma3")
    if flavor == "1B":
        released = RELEASED_1B
    else:
        released = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                    "text_config": RELEASED_TEXT_CONFIGS[flavor],
                    "vision_config": {"model_type": "siglip_vision_model"}}
    args = Gemma3StateDictAdapter.args_from_hf_config(released)
    assert args == gemma3_flavors[flavor] and spec.matching_flavor(args) == flavor
    if flavor == "1B":
        ours = Gemma3StateDictAdapter(args).hf_config("bfloat16")
        assert {k: ours[k] for k in released if k != "transformers_version"} == {
            k: v for k, v in released.items() if k != "transformers_version"}


# Text-model parameters (billions): 1B as published (its non-embedding count 698M too); the multimodal sizes'
# totals less their ~0.42B SigLIP vision tower and projector.
PUBLISHED = {"1B": 1.0, "4B": 3.88, "12B": 11.77, "27B": 27.01}


@pytest.mark.parametrize("flavor", list(PUBLISHED))
def test_flavor_sizes(flavor):
    model = get_train_spec("gemma3").build_meta_model(gemma3_flavors[flavor])
    assert model.num_params() / 1e9 == pytest.approx(PUBLISHED[flavor], rel=0.01)
    if flavor == "1B":
        assert (model.num_params() - model.tok_embeddings.weight.numel()) / 1e6 == pytest.approx(698, rel=0.01)


@pytest.mark.parametrize("changes,message", [
    (dict(tie_word_embeddings=False), r"tie_word_embeddings = False"),
    (dict(rope_scaling=YarnScaling()), r"rope_scaling is not linear"),
    (dict(feed_forward="swiglu"), r"differ from rms_plus_one/sandwich/head/geglu"),
    (dict(scale_embeddings=False), r"scale_embeddings = False"),
], ids=["untied", "yarn", "swiglu", "unscaled"])
def test_export_refuses_what_gemma3_cannot_express(tmp_path, changes, message):
    assert_export_refused(Gemma3StateDictAdapter(dataclasses.replace(gemma3_flavors["debugmodel"], **changes)), message)


def test_import_refuses_what_the_model_cannot_compute():
    for changes, message in ((dict(final_logit_softcapping=30.0), r"final_logit_softcapping 30\.0"),
                             (dict(attn_logit_softcapping=50.0), r"attn_logit_softcapping 50\.0"),
                             (dict(use_bidirectional_attention=True), r"use_bidirectional_attention"),
                             (dict(hidden_activation="silu"), r"hidden_activation 'silu'"),
                             (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"not supported for Gemma 3")):
        with pytest.raises(CheckpointError, match=message):
            Gemma3StateDictAdapter.args_from_hf_config({**RELEASED_1B, **changes}, "ckpt/config.json")
