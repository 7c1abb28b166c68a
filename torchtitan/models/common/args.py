"""One model-args base for every decoder family: the shape, plus the family differences as data.

A family (llama3, olmo, olmo2) is a subclass that only sets defaults (its norm,
block, RoPE layout, init scheme) and a flavor table of sizes. The decoder reads
everything from here, so the args alone rebuild a model: checkpoint markers
store them as JSON and tools rebuild the model without a config.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

from torchtitan.models.common.mla import MLAArgs
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import LinearScaling, RopeScaling, YarnScaling
from torchtitan.ops.attention import CAUSAL, AttentionMask

# layernorm: OLMo 1's non-parametric LayerNorm; rms_plus_one: Gemma's RMSNorm, scaled by (1 + w) in float32 with
# w starting at zero (every norm of the model, the QK-norms included).
NORMS = ("rms", "layernorm", "rms_plus_one")
# reordered_norm: OLMo 2 (norm after attention and after the MLP); sandwich: Gemma 3 (norms before and after both)
BLOCKS = ("pre_norm", "reordered_norm", "sandwich")
ROPE_LAYOUTS = ("interleaved", "half")  # Meta's adjacent pairs / GPT-NeoX and HF rotate-half
FEED_FORWARDS = ("swiglu", "geglu")  # geglu: GELU (tanh approximation) gate, Gemma's
# The attention slot's kinds (models/common/layers.py build_attention): grouped-query attention, and DeepSeek's
# multi-head latent attention (models/common/mla.py, shaped by `mla`).
ATTENTIONS = ("gqa", "mla")
# QK-norm: "width" normalizes the whole q (k) projection before the head split (OLMo 2, OLMoE); "head"
# normalizes each head over head_dim (Qwen3, Gemma 3), one weight of head_dim shared by every head.
QK_NORMS = ("width", "head")
INITS = ("llama", "olmo", "olmo2")  # see models/common/init.py
LAYER_ATTENTION = ("full", "sliding")  # entries of attention_pattern
ROPE_SCALING_LAYERS = ("all", "full")  # which layers rope_scaling applies to (OLMo 3: full-attention ones only)
# Fields that change how a run executes or starts, not the function the weights compute.
RUN_SETTINGS = ("max_seq_len", "sdpa_backend", "init", "init_std", "depth_init")


@dataclass
class DecoderArgs(ABC):
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None  # None: dim // n_heads (Qwen3 and Gemma 3 set it apart from the width)
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | YarnScaling | LinearScaling | None = None
    # "full": only the full-attention layers scale their RoPE, the sliding ones keep plain RoPE with the same
    # theta (transformers' Olmo3 applies a config's rope_scaling that way).
    rope_scaling_layers: str = "all"
    # The sliding-window layers' own RoPE theta, never scaled (Gemma 3: 10,000 locally, rope_theta globally).
    rope_local_theta: float | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    sdpa_backend: str = "default"
    norm: str = "rms"
    block: str = "pre_norm"
    attention: str = "gqa"
    qk_norm: str | None = None  # one of QK_NORMS, or None (a bool from older checkpoint markers: True = "width")
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] (OLMo 1.7)
    attention_bias: bool = False  # biases on the q, k, v and output projections (gpt-oss)
    attention_sinks: bool = False  # a learned logit per head in every softmax denominator (gpt-oss)
    # Softmax scale query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma 3).
    query_pre_attn_scalar: int | None = None
    scale_embeddings: bool = False  # embedding output multiplied by sqrt(dim) (Gemma)
    rope_layout: str = "interleaved"
    feed_forward: str = "swiglu"
    init: str = "llama"
    init_std: float = 0.02
    depth_init: bool = True  # llama init: output projections scaled by layer depth, not by n_layers
    # Sliding-window attention: a query sees the `sliding_window` most recent keys (itself included) in the
    # layers whose entry of `attention_pattern` is "sliding". The pattern repeats over the layers (OLMo 3:
    # sliding, sliding, sliding, full); empty means every layer is sliding when a window is set.
    sliding_window: int | None = None
    attention_pattern: tuple[str, ...] = ()
    # Mixture of experts in the feed-forward slot (models/common/moe.py); None: every layer dense.
    moe: MoEArgs | None = None
    mla: MLAArgs | None = None  # the latent attention's shape (attention = "mla")

    def __post_init__(self) -> None:
        for name, valid in (("norm", NORMS), ("block", BLOCKS), ("rope_layout", ROPE_LAYOUTS),
                            ("feed_forward", FEED_FORWARDS), ("init", INITS), ("attention", ATTENTIONS),
                            ("rope_scaling_layers", ROPE_SCALING_LAYERS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"model args {name} = {getattr(self, name)!r} is not one of {', '.join(valid)}")
        if isinstance(self.qk_norm, bool):
            self.qk_norm = "width" if self.qk_norm else None
        if self.qk_norm not in (None, *QK_NORMS):
            raise ValueError(f"model args qk_norm = {self.qk_norm!r} is not one of {', '.join(QK_NORMS)} (or None)")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"model args head_dim = {self.head_dim}: RoPE needs an even head_dim >= 2")
        self.attention_pattern = tuple(self.attention_pattern)  # a list after a JSON round trip
        bad = sorted(set(self.attention_pattern) - set(LAYER_ATTENTION))
        if bad:
            raise ValueError(f"model args attention_pattern entries {bad} are not one of {', '.join(LAYER_ATTENTION)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model args sliding_window = {self.sliding_window}; it must be >= 1 (or None)")
        if "sliding" in self.attention_pattern and self.sliding_window is None:
            raise ValueError("model args attention_pattern has sliding layers but sliding_window is not set")
        if (self.attention == "mla") != (self.mla is not None):
            raise ValueError("model args attention = 'mla' and mla (its shape) go together")
        if self.moe is not None and self.feed_forward != "swiglu":
            raise ValueError(f"model args feed_forward = {self.feed_forward!r}: experts are SwiGLUs (swiglu)")

    @property
    @abstractmethod
    def ffn_hidden_dim(self) -> int:
        """Width of the feed-forward hidden layer (a field in some families, derived in others)."""

    @property
    def attn_head_dim(self) -> int:
        """The width of one attention head: head_dim, or dim // n_heads where it is not set."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_head_dim(self) -> int:
        """The width RoPE rotates: a whole head, or MLA's decoupled RoPE part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.attn_head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def layer_attention(self, layer_id: int) -> str:
        """ "full" or "sliding" for layer `layer_id`."""
        if self.sliding_window is None:
            return "full"
        if not self.attention_pattern:
            return "sliding"
        return self.attention_pattern[layer_id % len(self.attention_pattern)]

    def layer_rope_scaling(self, layer_id: int) -> RopeScaling | YarnScaling | LinearScaling | None:
        """The RoPE scaling of layer `layer_id`: rope_scaling, or None where rope_scaling_layers leaves it out."""
        if self.rope_scaling_layers == "full" and self.layer_attention(layer_id) != "full":
            return None
        if self.rope_local_theta is not None and self.layer_attention(layer_id) == "sliding":
            return None
        return self.rope_scaling

    def layer_rope_theta(self, layer_id: int) -> float:
        if self.rope_local_theta is not None and self.layer_attention(layer_id) == "sliding":
            return self.rope_local_theta
        return self.rope_theta

    def layer_is_moe(self, layer_id: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer_id)

    def attention_mask(self, layer_id: int) -> AttentionMask:
        """Which keys layer `layer_id` attends to: causal, or causal within the sliding window."""
        if self.layer_attention(layer_id) == "sliding":
            return AttentionMask("sliding_window", self.sliding_window)
        return CAUSAL

    def architecture(self) -> dict:
        """What determines the function the weights compute: equal architectures load each other's weights
        and produce the same logits (flavor matching uses this)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_SETTINGS}
        out["ffn_hidden_dim"] = self.ffn_hidden_dim
        out["n_kv_heads"] = self.kv_heads
        out["head_dim"] = self.attn_head_dim
        return out
