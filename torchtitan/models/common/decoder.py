"""The one decoder: embedding, blocks keyed by global layer index, final norm, output projection.

Every family is this module with different args (models/common/args.py). Pipeline
stages set tok_embeddings / norm / output to None for the pieces they do not own,
and the ModuleDict keyed by layer index keeps FQNs stable when layers are removed.
Weight tying lives here only: `tie_weights()` makes the output use the embedding's
parameter, and whoever replaces parameters (to_empty, tensor parallel) calls it
again. Blocks and their slots declare their tensor-parallel plans (`norm_tp_plan`, `tp_plan`);
models/common/parallelize.py applies them.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.tensor.parallel import SequenceParallel

from torchtitan.models.common.args import DecoderArgs
from torchtitan.models.common.init import INIT_SCHEMES, ParameterInit
from torchtitan.models.common.layers import build_attention, build_feed_forward, build_norm
from torchtitan.models.common.rope import rope_cache


class Block(nn.Module):
    """Pre-norm block (Llama, OLMo 1): x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: DecoderArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = build_attention(args, layer_id)
        self.feed_forward = build_feed_forward(args, layer_id)
        self.build_norms(args)

    def build_norms(self, args: DecoderArgs) -> None:
        self.attention_norm = build_norm(args)
        self.ffn_norm = build_norm(args)

    def norms(self) -> list[nn.Module]:
        """Every norm of the block (their weights start at one)."""
        return [self.attention_norm, self.ffn_norm, *self.attention.norms()]

    def norm_tp_plan(self) -> dict:
        """The block's own norms under TP: sequence-parallel, their DTensor output feeding the slots'
        PrepareModuleInput."""
        return {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, positions, documents)
        return h + self.feed_forward(self.ffn_norm(h))


class ReorderedNormBlock(Block):
    """OLMo 2's block: the norms sit on the residual branches' outputs, none before them."""

    def build_norms(self, args: DecoderArgs) -> None:
        self.post_attention_norm = build_norm(args)
        self.post_ffn_norm = build_norm(args)

    def norms(self) -> list[nn.Module]:
        return [self.post_attention_norm, self.post_ffn_norm, *self.attention.norms()]

    def norm_tp_plan(self) -> dict:
        """The post-norms sit on the residual branch and hand back plain local tensors, so the residual add
        sees two plain (B, S/tp, D) tensors."""
        return {"post_attention_norm": SequenceParallel(use_local_output=True),
                "post_ffn_norm": SequenceParallel(use_local_output=True)}

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(x, rope, positions, documents))
        return h + self.post_ffn_norm(self.feed_forward(h))


class SandwichNormBlock(Block):
    """Gemma 3's block: norms before and after attention and the MLP, h = x + post(attn(pre(x)))."""

    def build_norms(self, args: DecoderArgs) -> None:
        self.attention_norm, self.post_attention_norm = build_norm(args), build_norm(args)
        self.ffn_norm, self.post_ffn_norm = build_norm(args), build_norm(args)

    def norms(self) -> list[nn.Module]:
        return [self.attention_norm, self.post_attention_norm, self.ffn_norm, self.post_ffn_norm,
                *self.attention.norms()]

    def norm_tp_plan(self) -> dict:
        """Pre-norms as in the pre-norm block (DTensor output into the slots), post-norms as OLMo 2's (plain
        local output onto the residual)."""
        return {**Block.norm_tp_plan(self), **ReorderedNormBlock.norm_tp_plan(self)}

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, positions, documents))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


BLOCK_CLASSES = {"pre_norm": Block, "reordered_norm": ReorderedNormBlock, "sandwich": SandwichNormBlock}


class Decoder(nn.Module):
    """Decoder-only transformer built from its args alone."""

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        block_cls = BLOCK_CLASSES[args.block]
        self.layers = nn.ModuleDict({str(i): block_cls(i, args) for i in range(args.n_layers)})
        self.norm = build_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self._build_rope_tables(device=None)

    def tie_weights(self) -> None:
        """Output and embedding share one parameter when the args say so (and this part holds both).

        Module._apply (to_empty, .to) and tensor parallel's parallelize_module replace parameters
        one module at a time, which unties them; each of those is followed by a call here. Under
        TP both are sharded on the vocabulary dim, so the embedding's DTensor serves the output as is.
        """
        if self.args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

    @property
    def is_tied(self) -> bool:
        return self.args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None

    def _rope_tables(self) -> dict[tuple, str]:
        """(theta, scaling) of each distinct RoPE the layers use -> its buffer name: rope_cache for rope_theta
        with rope_scaling, plain_rope_cache where layers skip the scaling (OLMo 3: YaRN on the full-attention
        layers only), local_rope_cache for the sliding layers' own theta (Gemma 3)."""
        a = self.args
        tables = {(a.rope_theta, _key(a.rope_scaling)): "rope_cache"}
        for i in range(a.n_layers):
            theta, scaling = a.layer_rope_theta(i), a.layer_rope_scaling(i)
            if (theta, _key(scaling)) not in tables:
                tables[(theta, _key(scaling))] = "plain_rope_cache" if theta == a.rope_theta else "local_rope_cache"
        return tables

    def _build_rope_tables(self, device) -> None:
        """Non-persistent: never in a checkpoint."""
        a = self.args
        for (theta, _), name in self._rope_tables().items():
            scaling = a.rope_scaling if name == "rope_cache" else None
            table = rope_cache(a.rope_head_dim, a.max_seq_len, theta, scaling, device=device)
            self.register_buffer(name, table, persistent=False)

    def layer_rope(self, layer_id: int) -> torch.Tensor:
        """The RoPE table of layer `layer_id` (the keys of `layers` are global layer indices, on every stage)."""
        a = self.args
        key = (a.layer_rope_theta(layer_id), _key(a.layer_rope_scaling(layer_id)))
        return getattr(self, self._rope_tables()[key])

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None, seed: int | None = None) -> None:
        """The weights a seed gives, on any layout (models/common/init.py); also rebuilds the RoPE tables and the
        tie after to_empty. seed None: torch's current seed (torch.initial_seed())."""
        device = buffer_device if buffer_device is not None else self.rope_cache.device
        self._build_rope_tables(device)
        self.tie_weights()
        seed = torch.initial_seed() if seed is None else seed
        INIT_SCHEMES[self.args.init](self, ParameterInit(self, seed))
        for block in self.layers.values():  # what the schemes leave alone; to_empty left it uninitialized
            block.attention.reset_extras()
            block.feed_forward.reset_buffers()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, S) ids, or (B, S, dim) activations on a later pipeline stage. positions: the tokens' RoPE
        positions (None: 0..S-1). documents: (B, S_global) document ids; attention then stays inside
        documents (trainer/documents.py)."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.args.scale_embeddings:
                # sqrt(dim) rounded to the activations' dtype first, as Gemma does.
                h = h * float(torch.tensor(self.args.dim ** 0.5, dtype=h.dtype))
        else:
            h = tokens
        for layer_id, layer in self.layers.items():
            h = layer(h, self.layer_rope(int(layer_id)), positions, documents)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Distinct parameters (a tied output counts once); without the embedding if asked; with `active`,
        experts count top_k of num_experts (what one token uses)."""
        share = self.args.moe.top_k / self.args.moe.num_experts if active and self.args.moe is not None else 1.0
        total = sum(round(p.numel() * (share if ".experts." in name else 1.0)) for name, p in self.named_parameters())
        if exclude_embedding and self.tok_embeddings is not None:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight that multiplies activations (every parameter but the
        embedding, the output counted even when tied) plus each layer's attention core as its attention kind
        declares it (GQA: 12 H Dh keys; causality halves nothing here, matching torchtitan's accounting so MFU
        numbers are comparable; a sliding-window layer counts min(S, window) keys instead of S)."""
        a = self.args
        # A token passes through top_k of the num_experts experts: charge their share of the expert weights.
        active = a.moe.top_k / a.moe.num_experts if a.moe is not None else 1.0
        weights = sum(p.numel() * (active if ".experts." in name else 1.0)
                      for name, p in self.named_parameters(remove_duplicate=False)
                      if not name.startswith("tok_embeddings."))
        # A sliding-window layer's query sees at most `window` keys: charge it min(S, window) keys.
        core = sum(block.attention.core_flops_per_token(
            min(seq_len, a.sliding_window) if a.layer_attention(int(i)) == "sliding" else seq_len)
            for i, block in self.layers.items())
        return 6 * weights + core


def _key(scaling) -> tuple | None:
    """A hashable stand-in for a RoPE scaling (dataclasses with eq are unhashable)."""
    return None if scaling is None else (type(scaling).__name__, *dataclasses.astuple(scaling))
