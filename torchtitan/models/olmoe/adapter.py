"""OLMoE native <-> transformers' OlmoeForCausalLM: names, the expert stacks, config.json.

OLMoE is a pre-norm RMSNorm decoder with QK-norm over the whole projection width (OLMo 2's) and every
feed-forward a mixture of experts. HF files hold one tensor per expert,
`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` (the released allenai/OLMoE-1B-7B-0924 files, and
what transformers 5.x save_pretrained writes although it fuses the experts in memory); ours stacks each
projection's experts into one (E, out, in) tensor. So an export unstacks and an import stacks: to_hf / from_hf
take whole state dicts or whole blocks (every caller passes those), and a caller that wants only names or
shapes passes meta tensors through them.

What OLMoE's HF format cannot say is refused by name, never dropped: a shared expert, sigmoid scores, an
expert bias, dense leading layers, RoPE scaling, sliding windows, and clip_qkv (transformers' Olmoe clips after
the QK-norm, our attention before it).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from torchtitan.models.common.adapter import HF_DECODER_TABLE, hf_rope_params
from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.olmo.adapter import OlmoStateDictAdapter
from torchtitan.models.olmoe.args import OlmoeModelArgs
from torchtitan.tools.errors import CheckpointError

# Native expert stack -> the HF name of one expert's slice: the first {} is the layer, the second the expert.
STACKED_TO_HF = {
    "layers.{}.feed_forward.experts.w1": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.feed_forward.experts.w3": "model.layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.feed_forward.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}
# What OlmoeConfig assumes for keys a config.json leaves out.
HF_DEFAULTS = {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0}
ROUTER_AUX_LOSS_COEF = 0.01  # the released model's; transformers applies it only when asked for router logits


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_STACKS = [(_pattern(native), native, _pattern(hf), hf) for native, hf in STACKED_TO_HF.items()]


def hf_cannot_express(a: DecoderArgs) -> list[str]:
    """What in `a` OlmoeForCausalLM cannot compute, one phrase each (empty: exportable)."""
    m = a.moe
    if m is None:
        return ["moe is None (every OLMoE feed-forward is a mixture of experts)"]
    checks = [
        (m.shared_expert_hidden_dim > 0,
         f"moe.shared_expert_hidden_dim = {m.shared_expert_hidden_dim} (no shared expert)"),
        (m.score_func != "softmax", f"moe.score_func = {m.score_func!r} (softmax only)"),
        (m.expert_bias, "moe.expert_bias = True (no expert bias)"),
        (m.n_dense_layers > 0, f"moe.n_dense_layers = {m.n_dense_layers} (every layer MoE)"),
        (a.clip_qkv is not None, f"clip_qkv = {a.clip_qkv} (transformers clips after the QK-norm, we before)"),
        (a.rope_scaling is not None, "rope_scaling is set (plain RoPE only)"),
        (a.sliding_window is not None, f"sliding_window = {a.sliding_window} (full attention only)"),
        ((a.norm, a.block, a.qk_norm, a.rope_layout) != ("rms", "pre_norm", True, "half"),
         "norm/block/qk_norm/rope_layout differ from rms/pre_norm/True/half"),
    ]
    return [msg for bad, msg in checks if bad]


class OlmoeStateDictAdapter(OlmoStateDictAdapter):
    hf_model_type = "olmoe"
    hf_architecture = "OlmoeForCausalLM"
    to_hf_table = {
        **{k: v for k, v in HF_DECODER_TABLE.items() if ".feed_forward." not in k},
        "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "layers.{}.feed_forward.router.gate.weight": "model.layers.{}.mlp.gate.weight",
        "norm.weight": "model.norm.weight",
    }
    args_cls: type[DecoderArgs] = OlmoeModelArgs
    # OLMo's GPT-NeoX-20B tokenizer ids, as in OLMoE-1B-7B-0924's config.json.
    token_ids = OlmoStateDictAdapter.token_ids

    def check_expressible(self) -> None:
        problems = hf_cannot_express(self.args)
        if problems:
            raise CheckpointError(f"model args {'; '.join(problems)}: OLMoE's HF format (OlmoeForCausalLM) cannot "
                                  f"express this; keep the checkpoint in DCP")

    # ------------------------------------------------------------------ names
    def native_key(self, hf_key: str) -> str | None:
        """The native tensor an HF tensor goes into (for an expert's slice: its stack)."""
        stacked = _stacked_slice(hf_key)
        return stacked[0] if stacked else super().native_key(hf_key)

    def hf_key(self, key: str) -> str:
        if any(p.match(key) for p, _, _, _ in _STACKS):
            raise CheckpointError(f"parameter {key!r} is one HF tensor per expert; map it with to_hf, not hf_key")
        return super().hf_key(key)

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_expressible()
        out = {}
        for k, v in state_dict.items():
            stack = next(((p, hf) for p, _, _, hf in _STACKS if p.match(k)), None)
            if stack is None:
                out.update(super().to_hf({k: v}))
                continue
            layer = stack[0].match(k).group(1)
            # A copy per expert: older safetensors releases refuse to save views of one storage (0.8, installed
            # here, accepts them); the copy costs one layer's experts, the export's unit of memory anyway.
            out.update({stack[1].format(layer, e): w.clone() for e, w in enumerate(v.unbind(0))})
        return out

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], hf_tied: bool = False) -> dict[str, torch.Tensor]:
        self.check_expressible()
        slices: dict[str, dict[int, torch.Tensor]] = {}
        rest = {}
        for hk, v in hf_state_dict.items():
            stacked = _stacked_slice(hk)
            if stacked is None:
                rest[hk] = v
            else:
                slices.setdefault(stacked[0], {})[stacked[1]] = v
        out = super().from_hf(rest, hf_tied=hf_tied)
        n = self.args.moe.num_experts
        for key, experts in slices.items():
            if sorted(experts) != list(range(n)):
                missing = sorted(set(range(n)) - set(experts))
                extra = sorted(set(experts) - set(range(n)))
                raise CheckpointError(f"{len(experts)} HF expert tensors for {key!r} but the model has {n} experts "
                                      f"(0..{n - 1}): missing {_few(missing)}, unexpected {_few(extra)}")
            shapes = {tuple(t.shape) for t in experts.values()}
            if len(shapes) > 1:
                raise CheckpointError(f"HF tensors of {key!r}: the experts differ in shape ({sorted(shapes)})")
            out[key] = torch.stack([experts[e] for e in range(n)])
        return out

    # ----------------------------------------------------------------- config
    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        self.check_expressible()
        a, m = self.args, self.args.moe
        return {
            **super().family_hf_config(dtype),  # OLMo's: token ids, rope_scaling None, dropout, init range
            "intermediate_size": m.hidden_dim,  # transformers' Olmoe has no dense feed-forward: the expert width
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.norm_topk_prob,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "output_router_logits": False,
            # 4.x reads the top-level rope_theta (written by hf_config); 5.x rope_parameters.
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "dtype": dtype,
        }

    def norm_hf_config(self) -> dict[str, Any]:
        return {"rms_norm_eps": self.args.norm_eps, "clip_qkv": None}

    @classmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        common = cls.common_args_from_hf(config, source)
        rope = hf_rope_params(config)
        if rope["rope_type"] != "default" or float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise CheckpointError(f"HF checkpoint {source}: rope_scaling / rope_parameters {rope} is not supported for "
                                  f"OLMoE (plain RoPE over the whole head only)")
        if config.get("clip_qkv") is not None:
            raise CheckpointError(f"HF checkpoint {source}: clip_qkv {config['clip_qkv']} is not supported for OLMoE "
                                  f"(transformers clips q, k, v after the QK-norm, our attention before it)")
        try:
            hidden = int(config["intermediate_size"])
            # num_local_experts: OlmoeConfig's alias of num_experts.
            experts = config.get("num_local_experts") or _hf_value(config, "num_experts")
            moe = MoEArgs(num_experts=int(experts),
                          top_k=int(_hf_value(config, "num_experts_per_tok")), hidden_dim=hidden,
                          norm_topk_prob=bool(_hf_value(config, "norm_topk_prob")))
            norm_eps = float(_hf_value(config, "rms_norm_eps"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json has a bad or missing expert or norm field "
                                  f"({e})") from None
        return cls.args_cls(**common, ffn_hidden_dim=hidden, moe=moe, norm_eps=norm_eps,
                            rope_theta=float(rope.get("rope_theta", HF_DEFAULTS["rope_theta"])))


def _few(items: list[int]) -> str:
    return (", ".join(map(str, items[:4])) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")) or "none"


def _hf_value(config: dict[str, Any], key: str) -> Any:
    """config[key], or OlmoeConfig's default where the file leaves it out or null."""
    return HF_DEFAULTS[key] if config.get(key) is None else config[key]


def _stacked_slice(hf_key: str) -> tuple[str, int] | None:
    """(native stack name, expert index) of an HF expert tensor, else None."""
    for _, native, hf_pattern, _ in _STACKS:
        m = hf_pattern.match(hf_key)
        if m:
            return native.format(m.group(1)), int(m.group(2))
    return None
