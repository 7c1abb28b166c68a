"""gpt-oss native <-> transformers' GptOssForCausalLM: names, the fused expert tensors, config.json.

transformers keeps each layer's experts as (E, in, out) matrices applied as x @ W, gate and up interleaved in
one tensor (`mlp.experts.gate_up_proj`, gate columns 0, 2, 4, ..., up columns 1, 3, 5, ...) with its bias
`gate_up_proj_bias`, and `down_proj` / `down_proj_bias`; ours are the (E, out, in) stacks w1 (gate), w3 (up),
w2 (down) and their biases b1, b3, b2. An export fuses, an import splits: to_hf / from_hf take whole state dicts
or whole blocks (every caller passes those). The released checkpoints store the experts in MXFP4
(`*_blocks`: two FP4 codes per byte along the input dim, `*_scales`: a power-of-two exponent per 32 values,
quantization_config.quant_method "mxfp4"): an import dequantizes them (exactly, into bfloat16) to the fused
tensors first. What GptOssForCausalLM cannot say is refused by name.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from torchtitan.models.common.adapter import (
    HF_DECODER_TABLE,
    StateDictAdapter,
    hf_rope_fields,
    hf_rope_params,
    yarn_from_hf,
)
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.gpt_oss.args import GptOssModelArgs, gpt_oss_moe
from torchtitan.tools.errors import CheckpointError

_HF_EXPERTS = "model.layers.{}.mlp.experts."
_NATIVE_EXPERTS = "layers.{}.feed_forward.experts."
# HF fused tensor -> the native tensors it holds (interleaved on its last dim when two).
FUSED = {"gate_up_proj": ("w1", "w3"), "gate_up_proj_bias": ("b1", "b3"), "down_proj": ("w2",),
         "down_proj_bias": ("b2",)}
_HF_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj(?:_bias)?|down_proj(?:_bias)?)$")
_NATIVE_FUSED = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3|b1|b2|b3)$")
_MXFP4 = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)$")
# The 16 values of an FP4 (E2M1) code, by its 4 bits.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
TO_HF_LAYER_TYPE = {"sliding": "sliding_attention", "full": "full_attention"}
TOKEN_IDS = {"eos_token_id": 200002, "pad_token_id": 199999}  # o200k_harmony, as in the released config.json
ROUTER_AUX_LOSS_COEF = 0.9  # the released models'; transformers applies it only when asked for router logits


def gpt_oss_cannot_express(a: DecoderArgs) -> list[str]:
    m = a.moe
    if m is None:
        return ["moe is None (every gpt-oss feed-forward is a mixture of experts)"]
    want = gpt_oss_moe(m.num_experts, m.hidden_dim, m.top_k)
    checks = [
        ((m.norm_topk_prob, m.router_bias, m.expert_linear_bias, m.gate, m.score_func) !=
         (True, True, True, "clamped_swiglu", "softmax"),
         "moe is not gpt-oss's (softmax over the top-k logits, router and expert biases, clamped_swiglu)"),
        (m.swiglu_alpha != want.swiglu_alpha, f"moe.swiglu_alpha = {m.swiglu_alpha} (1.702)"),
        (m.expert_bias or m.shared_expert_hidden_dim or m.n_dense_layers or m.dense_layer_ids or m.sparse_step != 1,
         "an expert bias, shared expert or dense layers (none)"),
        (not (a.attention_bias and a.attention_sinks), "attention without biases or sinks (both)"),
        ((a.norm, a.block, a.qk_norm, a.rope_layout, a.attention, a.tie_word_embeddings, a.clip_qkv) !=
         ("rms", "pre_norm", None, "half", "gqa", False, None),
         "norm/block/qk_norm/rope_layout/attention/tying/clip_qkv differ from rms/pre_norm/None/half/gqa/untied/None"),
        (a.rope_scaling is not None and not isinstance(a.rope_scaling, YarnScaling), "rope_scaling is not yarn"),
        (a.sliding_window is None, "sliding_window is None (gpt-oss has sliding layers)"),
    ]
    return [msg for bad, msg in checks if bad]


class GptOssStateDictAdapter(StateDictAdapter):
    hf_model_type = "gpt_oss"
    hf_architecture = "GptOssForCausalLM"
    to_hf_table = {
        **{k: v for k, v in HF_DECODER_TABLE.items() if ".feed_forward." not in k},
        **{k.replace(".weight", ".bias"): v.replace(".weight", ".bias")
           for k, v in HF_DECODER_TABLE.items() if ".attention.w" in k},
        "layers.{}.attention.sinks": "model.layers.{}.self_attn.sinks",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.feed_forward.router.gate.weight": "model.layers.{}.mlp.router.weight",
        "layers.{}.feed_forward.router.gate.bias": "model.layers.{}.mlp.router.bias",
        "norm.weight": "model.norm.weight",
    }
    args_cls: type[DecoderArgs] = GptOssModelArgs

    def cannot_express(self) -> list[str]:
        return gpt_oss_cannot_express(self.args)

    # ------------------------------------------------------------------ names
    def native_key(self, hf_key: str) -> str | None:
        mx = _MXFP4.match(hf_key)
        if mx:  # a released MXFP4 expert tensor: part of the fused one it dequantizes to
            hf_key = mx.group(1)
        m = _HF_FUSED.match(hf_key)
        if m:  # the first native tensor of the fused one (from_hf makes all of them)
            return _NATIVE_EXPERTS.format(m.group(1)) + FUSED[m.group(2)][0]
        return super().native_key(hf_key)

    def hf_key(self, key: str) -> str:
        if _NATIVE_FUSED.match(key):
            raise CheckpointError(f"parameter {key!r} is part of a fused HF expert tensor; map it with to_hf")
        return super().hf_key(key)

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In the order of `state_dict` (streaming exports rely on it), a layer's fused expert tensors where its
        first expert tensor is."""
        self.check_expressible()
        out: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            m = _NATIVE_FUSED.match(k)
            if m is None:
                out.update(super().to_hf({k: v}))
            elif _HF_EXPERTS.format(m.group(1)) + "gate_up_proj" not in out:
                out.update(self._fuse(m.group(1), state_dict))
        return out

    def _fuse(self, layer: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        native = {name: state_dict.get(_NATIVE_EXPERTS.format(layer) + name)
                  for name in ("w1", "w2", "w3", "b1", "b2", "b3")}
        missing = sorted(n for n, t in native.items() if t is None)
        if missing:
            raise CheckpointError(f"layer {layer}'s experts lack {', '.join(missing)}: gpt-oss's HF tensors fuse "
                                  f"them, so export whole blocks")
        prefix = _HF_EXPERTS.format(layer)
        return {prefix + "gate_up_proj": _interleave(native["w1"].transpose(1, 2), native["w3"].transpose(1, 2)),
                prefix + "gate_up_proj_bias": _interleave(native["b1"], native["b3"]),
                prefix + "down_proj": native["w2"].transpose(1, 2).contiguous(),
                prefix + "down_proj_bias": native["b2"].clone()}

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], hf_tied: bool = False) -> dict[str, torch.Tensor]:
        self.check_expressible()
        hf_state_dict = _dequantize_mxfp4(hf_state_dict)
        fused = {k: v for k, v in hf_state_dict.items() if _HF_FUSED.match(k)}
        out = super().from_hf({k: v for k, v in hf_state_dict.items() if k not in fused}, hf_tied=hf_tied)
        for hk, v in fused.items():
            layer, kind = _HF_FUSED.match(hk).groups()
            prefix = _NATIVE_EXPERTS.format(layer)
            if kind == "gate_up_proj":  # (E, in, 2 out) -> two (E, out, in)
                out[prefix + "w1"] = v[..., 0::2].transpose(1, 2).contiguous()
                out[prefix + "w3"] = v[..., 1::2].transpose(1, 2).contiguous()
            elif kind == "gate_up_proj_bias":
                out[prefix + "b1"], out[prefix + "b3"] = v[..., 0::2].contiguous(), v[..., 1::2].contiguous()
            elif kind == "down_proj":
                out[prefix + "w2"] = v.transpose(1, 2).contiguous()
            else:
                out[prefix + "b2"] = v.clone()
        return out

    # ----------------------------------------------------------------- config
    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        a, m = self.args, self.args.moe
        rope, scaling = hf_rope_fields(a.rope_theta, a.rope_scaling)
        return {
            "head_dim": a.attn_head_dim, "rms_norm_eps": a.norm_eps, "attention_bias": True,
            "intermediate_size": m.hidden_dim, "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k, "experts_per_token": m.top_k, "swiglu_limit": m.swiglu_limit,
            "sliding_window": a.sliding_window,
            "layer_types": [TO_HF_LAYER_TYPE[a.layer_attention(i)] for i in range(a.n_layers)],
            "rope_scaling": scaling, "rope_parameters": rope,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF, "output_router_logits": False,
            "initial_context_length": (a.rope_scaling.original_max_position_embeddings if a.rope_scaling is not None
                                       else a.max_seq_len),
            "attention_dropout": 0.0, "initializer_range": a.init_std, "use_cache": True, "dtype": dtype,
            # Ids outside the vocabulary (a debug model with a small tokenizer) would break transformers.
            **{k: (v if v < a.vocab_size else None) for k, v in TOKEN_IDS.items()},
        }

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        # gpt-oss has biases: the common check refuses them, so it sees the file without attention_bias.
        if not config.get("attention_bias", True):
            raise CheckpointError(f"HF checkpoint {source}: attention_bias is false; gpt-oss's projections have "
                                  f"biases")
        common = cls.common_args_from_hf({**config, "attention_bias": False}, source)
        common.setdefault("head_dim", common["dim"] // common["n_heads"])
        limit = float(config.get("swiglu_limit", 7.0))
        try:
            experts = int(config.get("num_local_experts") or config["num_experts"])
            top_k = int(config.get("num_experts_per_tok") or config["experts_per_token"])
            moe = gpt_oss_moe(experts, int(config["intermediate_size"]), top_k)
            moe.swiglu_limit = limit
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json has a bad or missing expert field "
                                  f"({e})") from None
        types = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                              for i in range(common["n_layers"])]
        layers = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
        period = next(p for p in range(1, len(layers) + 1)
                      if all(layers[i] == layers[i % p] for i in range(len(layers))))
        rope = hf_rope_params(config)
        if rope["rope_type"] not in ("default", "yarn"):
            raise CheckpointError(f"HF checkpoint {source}: rope_type {rope['rope_type']!r} is not supported for "
                                  f"gpt-oss (default, yarn)")
        scaling = yarn_from_hf(rope, config, source, "rope_parameters") if rope["rope_type"] == "yarn" else None
        return cls.args_cls(**common, ffn_hidden_dim=moe.hidden_dim, moe=moe,
                            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                            rope_theta=float(rope.get("rope_theta", 150000.0)), rope_scaling=scaling,
                            sliding_window=int(config.get("sliding_window") or 128), attention_pattern=layers[:period])


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., n) and (..., n) -> (..., 2n) with a in the even and b in the odd positions."""
    return torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def mxfp4_to_bfloat16(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An MXFP4 expert tensor as transformers holds it dense: blocks (E, rows, G, 16) uint8, each byte two FP4
    codes (low nibble first) along the input dim, scales (E, rows, G) uint8 exponents biased by 127 for each
    32 values -> (E, G x 32, rows), the x @ W layout. Exact: FP4 values times powers of two are bfloat16 values."""
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16, device=blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1).flatten(-2)  # (.., G, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).to(values.dtype))
    return values.flatten(-2).transpose(1, 2).contiguous()


def _dequantize_mxfp4(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each (X_blocks, X_scales) pair replaced by the dense X."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for k, v in hf_state_dict.items():
        m = _MXFP4.match(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    for name, parts in pairs.items():
        if set(parts) != {"blocks", "scales"}:
            raise CheckpointError(f"HF tensor {name}_blocks/_scales: MXFP4 needs both, the checkpoint has only "
                                  f"{', '.join(sorted(parts))}")
        out[name] = mxfp4_to_bfloat16(parts["blocks"], parts["scales"])
    return out
