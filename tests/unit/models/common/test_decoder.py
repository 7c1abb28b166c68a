"""The one decoder (models/common/decoder.py): its own numbers for every family (parameter count against
transformers' model of the same config, FLOPs per token against torch's FLOP counter on a real forward +
backward), MoE layers in a dense family, and a RoPE table that is computed, never saved."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from torchtitan.models import get_train_spec, model_names
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.llama3 import Llama3StateDictAdapter, llama3_flavors
from torchtitan.tools.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _debug(name: str):
    spec = get_train_spec(name)
    args = spec.model_args("debugmodel")
    args.max_seq_len = 64
    return spec, args


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("tied", [False, True])
def test_num_params_equals_transformers(name, tied):
    spec, args = _debug(name)
    if tied and name == "llama3":
        pytest.skip("our Llama keeps the output separate (an HF tied Llama is untied on import)")
    if not tied and name == "gemma3":
        pytest.skip("Gemma always ties the output to the embedding (an untied export is refused)")
    if tied and name in ("gpt_oss", "deepseek_v3"):
        pytest.skip(f"{name} never ties them (a tied export is refused)")
    args.tie_word_embeddings = tied
    ours = spec.build_meta_model(args)
    config = transformers.AutoConfig.for_model(**spec.adapter(args).hf_config())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    embedding = args.vocab_size * args.dim
    assert ours.num_params(exclude_embedding=True) == ours.num_params() - embedding


@pytest.mark.parametrize("name", model_names())
def test_flops_per_token_equal_counted_matmul_flops(name):
    """6 FLOPs per matmul weight per token (forward 2, backward 4) plus attention's 12 L H Dh S, counted by
    torch on the math SDPA path (whose matmuls the counter sees). Norm weights are in the 6N term but are no
    matmul, so the counter misses exactly 6 x their count."""
    spec, args = _debug(name)
    # Sliding-window layers (OLMo 3) attend blockwise through kernels the counter does not see: counted here
    # as full-attention layers (sequence 32 < window); the window's discount is tested below.
    args.attention_pattern = ("full",)
    seq = 32
    torch.manual_seed(0)
    model = spec.build_model(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (1, seq))
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        model(tokens).float().square().mean().backward()
    # Weights that multiply nothing: norm weights, biases and attention sinks (gpt-oss); experts' at their share.
    share = args.moe.top_k / args.moe.num_experts if args.moe is not None else 1.0
    no_matmul = sum(p.numel() * (share if ".experts." in n else 1.0) for n, p in model.named_parameters()
                    if "norm" in n.split(".")[-2] or n.endswith((".bias", ".sinks", ".b1", ".b2", ".b3")))
    expected = model.flops_per_token(seq) * seq - 6 * no_matmul * seq
    if args.attention_sinks:  # sinks attend blockwise, through kernels the counter does not see
        expected -= sum(b.attention.core_flops_per_token(seq) for b in model.layers.values()) * seq
    if args.mla is not None:  # values zero-padded to the q/k head dim: work done, not charged as model FLOPs
        expected += 6 * args.n_heads * (args.mla.qk_head_dim - args.mla.v_head_dim) * seq * seq * args.n_layers
    assert counter.get_total_flops() == expected


def test_flops_per_token_charges_sliding_layers_their_window():
    spec, args = _debug("olmo3")
    model = spec.build_model(args)
    args_full = dataclasses.replace(args, attention_pattern=("full",))
    full = spec.build_model(args_full)
    sliding = sum(args.layer_attention(i) == "sliding" for i in range(args.n_layers))
    assert sliding == 3 and args.sliding_window < 1024
    saved = 12 * args.n_heads * args.attn_head_dim * sliding * (1024 - args.sliding_window)
    assert full.flops_per_token(1024) - model.flops_per_token(1024) == saved
    assert full.flops_per_token(args.sliding_window) == model.flops_per_token(args.sliding_window)


def test_a_dense_family_takes_experts():
    """The MoE layer is a decoder option: Llama 3 with experts in every layer but the first trains, and its HF
    export is refused by name (transformers' Llama has no experts)."""
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


def test_rope_table_not_in_state_dict():
    with torch.device("meta"):
        model = Decoder(llama3_flavors["debugmodel"])
    assert not any("rope" in k or "freqs" in k for k in model.state_dict())
