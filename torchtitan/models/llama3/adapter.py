"""Llama 3 native (Meta names) <-> transformers' LlamaForCausalLM: names, q/k rotary permutation, config.json."""
from __future__ import annotations

from typing import Any

import torch

from torchtitan.models.common.adapter import (
    HF_DECODER_TABLE,
    StateDictAdapter,
    hf_rope_fields,
    hf_rope_params,
    permute_to_interleaved,
    permute_to_rotate_half,
)
from torchtitan.models.common.rope import RopeScaling
from torchtitan.models.llama3.args import LlamaModelArgs, llama3_flavors
from torchtitan.tools.errors import CheckpointError


class Llama3StateDictAdapter(StateDictAdapter):
    hf_model_type = "llama"
    hf_architecture = "LlamaForCausalLM"
    to_hf_table = {
        **HF_DECODER_TABLE,
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
    }

    def _heads(self, key: str) -> int | None:
        if key.endswith("attention.wq.weight"):
            return self.args.n_heads
        if key.endswith("attention.wk.weight"):
            return self.args.kv_heads
        return None

    def transform_to_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        h = self._heads(key)
        return permute_to_rotate_half(value, h) if h else value

    def transform_from_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        h = self._heads(key)
        return permute_to_interleaved(value, h) if h else value

    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        """Both the transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) rope keys."""
        a = self.args
        rope, scaling = hf_rope_fields(a.rope_theta, a.rope_scaling)
        return {"head_dim": a.attn_head_dim, "rms_norm_eps": a.norm_eps, "mlp_bias": False, "rope_scaling": scaling,
                "rope_parameters": rope, "dtype": dtype}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> LlamaModelArgs:
        common = cls.common_args_from_hf(config, source)
        # Ours stays untied: an HF file that ties them gets an explicit output matrix (a copy).
        common["tie_word_embeddings"] = False
        args = LlamaModelArgs(**common, norm_eps=float(config.get("rms_norm_eps", 1e-5)))
        rope = hf_rope_params(config)
        args.rope_theta = float(rope.get("rope_theta", 10000.0))
        if rope["rope_type"] == "llama3":
            args.rope_scaling = RopeScaling(factor=float(rope["factor"]),
                                            low_freq_factor=float(rope["low_freq_factor"]),
                                            high_freq_factor=float(rope["high_freq_factor"]),
                                            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        elif rope["rope_type"] != "default":
            raise CheckpointError(f"HF checkpoint {source}: rope_type {rope['rope_type']!r} is not supported "
                                  f"(default, llama3)")
        # Our FFN width is derived (multiple_of, ffn_dim_multiplier): reuse a flavor's rule when one
        # gives this intermediate_size, else a multiplier that reproduces it exactly.
        inter = int(config["intermediate_size"])
        for flavor in llama3_flavors.values():
            if flavor.dim == args.dim and flavor.ffn_hidden_dim == inter:
                args.multiple_of, args.ffn_dim_multiplier = flavor.multiple_of, flavor.ffn_dim_multiplier
                break
        else:
            args.multiple_of = 1
            base = int(2 * 4 * args.dim / 3)
            args.ffn_dim_multiplier = None if base == inter else (inter + 0.5) / base
        assert args.ffn_hidden_dim == inter, (args, inter)
        return args
