"""Our Llama forward equals transformers' LlamaForCausalLM on the same random weights."""
import dataclasses

import pytest
import torch

from torchtitan.models import get_train_spec
from torchtitan.models.common.decoder import Decoder as Transformer
from torchtitan.models.common.rope import RopeScaling
from torchtitan.models.llama3 import Llama3StateDictAdapter, LlamaModelArgs, llama3_flavors

transformers = pytest.importorskip("transformers")


def hf_config(args: LlamaModelArgs):
    rope_scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    return transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        torch_dtype="float32", attn_implementation="eager")


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, original_max_position_embeddings=32)])
def test_logits_match_transformers(scaling):
    torch.manual_seed(0)
    args = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=2, max_seq_len=128, rope_scaling=scaling)
    ours = Transformer(args)
    ours.init_weights()
    # Randomize the norms too, so the test sees every weight's mapping.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    hf = transformers.LlamaForCausalLM(hf_config(args)).eval()
    sd = Llama3StateDictAdapter(args).to_hf(ours.state_dict())
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = torch.randint(0, args.vocab_size, (2, 100))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
    # And back: HF -> ours reproduces our weights exactly.
    back = Llama3StateDictAdapter(args).from_hf(hf.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


# 1B/3B keep a separate output layer (Llama 3.2 ties it: 1.24B / 3.21B), as torchtitan does.
@pytest.mark.parametrize("flavor,params_b", [("1B", 1.50), ("3B", 3.61), ("8B", 8.03), ("70B", 70.6), ("405B", 405.9)])
def test_flavor_sizes(flavor, params_b):
    model = get_train_spec("llama3").build_meta_model(llama3_flavors[flavor])
    assert model.num_params(exclude_embedding=False) / 1e9 == pytest.approx(params_b, rel=0.02)
