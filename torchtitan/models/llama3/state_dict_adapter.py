"""Llama 3 native (Meta names) <-> HF transformers names, with the rotary permutation."""
from __future__ import annotations

import torch

from torchtitan.models.common.state_dict_adapter import TableAdapter, permute_to_interleaved, permute_to_rotate_half


class Llama3StateDictAdapter(TableAdapter):
    to_hf_table = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
        "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
        "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
        "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
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
