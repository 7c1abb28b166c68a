"""The declared contract between a model family and checkpoint formats: native <-> HF transformers.

Names go through a table (`{}` is the layer index) plus the few real transforms a
family writes once (the q/k rotary permutation for Llama). The config.json
mapping is split the same way: the fields every HF decoder has are written here,
a family adds its own. Weight tying means one thing everywhere: a tied model has
no `lm_head.weight` in HF files, and an HF file that ties a model we keep untied
gets an explicit copy of the embedding as its output matrix.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.rope import RopeScaling, YarnScaling
from torchtitan.tools.errors import CheckpointError

HF_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)  # derived buffers some HF checkpoints carry

# The names every Llama-style HF decoder (LlamaForCausalLM, OlmoForCausalLM, ...) gives the decoder's
# projections; a family's table adds its norms.
HF_DECODER_TABLE = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "output.weight": "lm_head.weight",
}


def permute_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k from Meta's interleaved-pair RoPE layout to HF's rotate-half layout."""
    out_dim, in_dim = w.shape[0], w.shape[1:]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *in_dim).transpose(1, 2).reshape(out_dim, *in_dim)


def permute_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_to_rotate_half."""
    out_dim, in_dim = w.shape[0], w.shape[1:]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *in_dim).transpose(1, 2).reshape(out_dim, *in_dim)


def _pattern(template: str) -> re.Pattern:
    """A name template ({} for each index) as a regex capturing the indices."""
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _compile(table: dict[str, str], reverse: bool) -> list[tuple[re.Pattern, str]]:
    pairs = [(v, k) if reverse else (k, v) for k, v in table.items()]
    return [(_pattern(src), dst) for src, dst in pairs]


def _few(items: list[int]) -> str:
    return (", ".join(map(str, items[:4])) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")) or "none"


def hf_rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings of a config.json: transformers < 5 writes rope_theta + rope_scaling, 5.x rope_parameters."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    return params


def hf_rope_scaling(scaling: RopeScaling | YarnScaling) -> dict[str, Any]:
    """transformers' rope_scaling / rope_parameters entry for one of our scalings (rope_theta left to the caller)."""
    if isinstance(scaling, RopeScaling):
        return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    out = {"rope_type": "yarn", "factor": scaling.factor,
           "original_max_position_embeddings": scaling.original_max_position_embeddings,
           "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(scaling, key) is not None:
            out[key] = getattr(scaling, key)
    if not scaling.truncate:
        out["truncate"] = False
    return out


def hf_rope_fields(theta: float, scaling: RopeScaling | YarnScaling | None) -> tuple[dict[str, Any], dict | None]:
    """(rope_parameters, rope_scaling) of config.json: transformers 5.x reads the first, 4.x the second (with the
    top-level rope_theta)."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}, None
    entry = hf_rope_scaling(scaling)
    return {**entry, "rope_theta": theta}, entry


def yarn_from_hf(params: dict[str, Any], config: dict[str, Any], source: str, where: str) -> YarnScaling:
    """YarnScaling from transformers' yarn parameters (`where` names them in errors), with the defaults
    transformers 5.24 fills in: original_max_position_embeddings = max_position_embeddings, a null factor =
    their ratio, beta_fast / beta_slow 32 / 1 when absent or zero."""
    try:
        original = int(params.get("original_max_position_embeddings") or config["max_position_embeddings"])
        factor = params.get("factor")
        factor = float(factor) if factor is not None else config["max_position_embeddings"] / original
        optional = {k: float(params[k]) for k in ("attention_factor", "mscale", "mscale_all_dim")
                    if params.get(k) is not None}
        scaling = YarnScaling(factor=factor, original_max_position_embeddings=original,
                              beta_fast=float(params.get("beta_fast") or 32),
                              beta_slow=float(params.get("beta_slow") or 1),
                              truncate=bool(params.get("truncate", True)), **optional)
        partial = float(params.get("partial_rotary_factor", 1.0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"HF checkpoint {source}: {where} has a bad or missing yarn parameter ({e})") from None
    if partial != 1.0:
        raise CheckpointError(f"HF checkpoint {source}: {where} sets partial_rotary_factor {partial}; our RoPE "
                              f"rotates the whole head (1.0)")
    return scaling


class StateDictAdapter(ABC):
    """One family's mapping to and from transformers' names and config.json."""

    hf_model_type: ClassVar[str]
    hf_architecture: ClassVar[str]
    to_hf_table: ClassVar[dict[str, str]]
    # MoE families: native (E, out, in) expert stack -> the HF name of one expert's slice (the first {} is the
    # layer, the second the expert). HF files hold one tensor per expert; an export unstacks, an import stacks.
    expert_stacks: ClassVar[dict[str, str]] = {}
    # Other model_type values whose folders this adapter reads (a multimodal release's text model).
    also_reads_model_types: ClassVar[tuple[str, ...]] = ()
    # HF tensors that belong to no part of our model and are left out on import (a vision tower).
    skipped_hf_prefixes: ClassVar[tuple[str, ...]] = ()

    def skipped(self, hf_key: str) -> bool:
        """HF tensors an import leaves out: derived buffers, and what `skipped_hf_prefixes` names."""
        return hf_key.endswith(HF_DERIVED_SUFFIXES) or hf_key.startswith(self.skipped_hf_prefixes)

    def __init__(self, args: DecoderArgs):
        self.args = args
        self._to_hf = _compile(self.to_hf_table, reverse=False)
        self._from_hf = _compile(self.to_hf_table, reverse=True)
        self._stacks = [(_pattern(native), native, _pattern(hf), hf) for native, hf in self.expert_stacks.items()]

    def cannot_express(self) -> list[str]:
        """What in these args transformers' model class of this family cannot compute, one phrase each (empty:
        exportable). The base: a dense family's HF format has no experts (MoE families override this)."""
        return ["moe is set (no mixture-of-experts layers)"] if self.args.moe is not None else []

    def check_expressible(self) -> None:
        """CheckpointError, one line naming every problem, if `cannot_express` finds any."""
        problems = self.cannot_express()
        if problems:
            raise CheckpointError(f"model args {'; '.join(problems)}: transformers' {self.hf_architecture} cannot "
                                  f"express this; keep the checkpoint in DCP")

    # ------------------------------------------------------------------ names
    @staticmethod
    def _rename(key: str, table) -> str | None:
        for pattern, target in table:
            m = pattern.match(key)
            if m:
                return target.replace("{}", m.group(1)) if m.groups() else target
        return None

    def hf_key(self, key: str) -> str:
        if any(p.match(key) for p, _, _, _ in self._stacks):
            raise CheckpointError(f"parameter {key!r} is one HF tensor per expert; map it with to_hf, not hf_key")
        out = self._rename(key, self._to_hf)
        if out is None:
            raise CheckpointError(f"parameter {key!r} has no HF name in the {self.hf_model_type} mapping")
        return out

    def native_key(self, hf_key: str) -> str | None:
        """The native tensor an HF tensor goes into (for an expert's slice: its stack)."""
        stacked = self._stacked_slice(hf_key)
        return stacked[0] if stacked else self._rename(hf_key, self._from_hf)

    def _stacked_slice(self, hf_key: str) -> tuple[str, int] | None:
        """(native stack name, expert index) of an HF expert tensor, else None."""
        for _, native, hf_pattern, _ in self._stacks:
            m = hf_pattern.match(hf_key)
            if m:
                return native.format(m.group(1)), int(m.group(2))
        return None

    def transform_to_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def transform_from_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors from native ones: whole state dicts or whole blocks (an expert stack becomes one tensor
        per expert; a caller that wants only names or shapes passes meta tensors)."""
        self.check_expressible()
        if self.args.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
        out = {}
        for k, v in state_dict.items():
            stack = next(((p, hf) for p, _, _, hf in self._stacks if p.match(k)), None)
            if stack is None:
                out[self.hf_key(k)] = self.transform_to_hf(k, v)
                continue
            layer = stack[0].match(k).group(1)
            # A copy per expert: older safetensors releases refuse to save views of one storage; the copy costs
            # one layer's experts, the export's unit of memory anyway.
            out.update({stack[1].format(layer, e): w.clone() for e, w in enumerate(v.unbind(0))})
        return out

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], hf_tied: bool = False) -> dict[str, torch.Tensor]:
        """Native tensors from HF ones. hf_tied: the HF config ties the output to the embedding."""
        self.check_expressible()
        if self.args.tie_word_embeddings:
            # Some exporters write lm_head.weight for tied models too; the embedding is the one weight.
            hf_state_dict = {k: v for k, v in hf_state_dict.items() if k != "lm_head.weight"}
        out, slices = {}, {}
        for hk, v in hf_state_dict.items():
            stacked = self._stacked_slice(hk)
            if stacked is not None:
                slices.setdefault(stacked[0], {})[stacked[1]] = v
                continue
            if self.skipped(hk):
                continue
            k = self.native_key(hk)
            if k is None:
                raise CheckpointError(f"HF tensor {hk!r} has no native name for this model ({self.hf_model_type})")
            out[k] = self.transform_from_hf(k, v)
        out.update(self._stack_experts(slices))
        if "output.weight" not in out and "tok_embeddings.weight" in out:
            if self.args.tie_word_embeddings:
                out["output.weight"] = out["tok_embeddings.weight"]
            elif hf_tied:
                out["output.weight"] = out["tok_embeddings.weight"].clone()
        return out

    def _stack_experts(self, slices: dict[str, dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        n = self.args.moe.num_experts if self.args.moe is not None else 0
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
    def hf_config(self, dtype: str | torch.dtype = "float32") -> dict[str, Any]:
        """config.json for transformers; dtype names the weights' dtype (string or torch.dtype)."""
        self.check_expressible()
        a = self.args
        dtype = str(dtype).removeprefix("torch.")
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.hf_model_type,
            "vocab_size": a.vocab_size,
            "hidden_size": a.dim,
            "intermediate_size": a.ffn_hidden_dim,
            "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads,
            **({"head_dim": a.head_dim} if a.head_dim is not None else {}),
            "hidden_act": "silu",
            "max_position_embeddings": a.max_seq_len,
            # Top-level rope_theta is what transformers 4.x reads; 5.x converts it to rope_parameters.
            "rope_theta": a.rope_theta,
            "attention_bias": False,
            "tie_word_embeddings": a.tie_word_embeddings,
            "torch_dtype": dtype,  # transformers 4.x name; 5.x reads it as `dtype`
            **self.family_hf_config(dtype),
        }

    @abstractmethod
    def family_hf_config(self, dtype: str) -> dict[str, Any]:
        """The config.json fields only this family has."""

    @classmethod
    def common_args_from_hf(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        """DecoderArgs fields every HF decoder config gives, checked for what none of our families has."""
        if config.get("model_type", cls.hf_model_type) != cls.hf_model_type:
            raise CheckpointError(f"HF checkpoint {source}: model_type {config.get('model_type')!r} is not "
                                  f"{cls.hf_model_type!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"HF checkpoint {source}: hidden_act {config['hidden_act']!r}: only silu "
                                  f"(SwiGLU) is supported")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise CheckpointError(f"HF checkpoint {source}: attention/MLP biases are not supported")
        try:
            dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv = int(config.get("num_key_value_heads") or heads)
            out = dict(dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
                       n_kv_heads=None if kv == heads else kv, vocab_size=int(config["vocab_size"]),
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
            if "max_position_embeddings" in config:
                out["max_seq_len"] = int(config["max_position_embeddings"])
            int(config["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"HF checkpoint {source}: config.json lacks a field "
                                  f"or has a bad value ({e})") from None
        try:
            head_dim = int(config.get("head_dim") or dim // heads)
        except (TypeError, ValueError):
            raise CheckpointError(f"HF checkpoint {source}: head_dim {config['head_dim']!r} is not an int") from None
        if head_dim != dim // heads:
            out["head_dim"] = head_dim
        return out

    @classmethod
    @abstractmethod
    def args_from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderArgs:
        """Model args equal to an HF config.json (CheckpointError naming `source` if none are)."""
