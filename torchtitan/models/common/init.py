"""Initial weights, one scheme per family, chosen by `args.init`.

Each scheme draws from the global RNG in a fixed order, so a seed gives the same
weights every time on one process. Modules a pipeline stage does not own are None
and skipped. Norm weights are reset to ones (non-parametric norms have none).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def _trunc(w, std: float) -> None:
    """N(0, std) truncated at 3 sigma (OLMo's and Llama's output-layer convention)."""
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def _reset_norms(block: nn.Module) -> None:
    for norm in block.norms():
        norm.reset_parameters()


def _blocks(model: nn.Module):
    return [(int(i), b) for i, b in model.layers.items()]


def init_llama(model: nn.Module) -> None:
    """torchtitan's Llama init: embedding N(0, 1), in-projections N(0, init_std) truncated at +-2, output
    projections of each block scaled by depth (1 / sqrt(2 (layer + 1))), output layer dim^-0.5 at 3 sigma."""
    a = model.args
    if model.tok_embeddings is not None:
        nn.init.normal_(model.tok_embeddings.weight)
    for layer_id, block in _blocks(model):
        depth = (layer_id + 1) if a.depth_init else a.n_layers
        out_std = 0.02 / (2 * depth) ** 0.5
        _reset_norms(block)
        attn, ffn = block.attention, block.feed_forward
        for lin in (attn.wq, attn.wk, attn.wv):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=a.init_std)
        nn.init.trunc_normal_(attn.wo.weight, mean=0.0, std=out_std)
        nn.init.trunc_normal_(ffn.w1.weight, mean=0.0, std=a.init_std)
        nn.init.trunc_normal_(ffn.w2.weight, mean=0.0, std=out_std)
        nn.init.trunc_normal_(ffn.w3.weight, mean=0.0, std=out_std)
    if model.norm is not None:
        model.norm.reset_parameters()
    if model.output is not None:
        _trunc(model.output.weight, a.dim ** -0.5)


def _init_olmo_embeddings(model: nn.Module, std: float) -> None:
    if model.tok_embeddings is not None:
        _trunc(model.tok_embeddings.weight, std)
    if model.output is not None and not model.args.tie_word_embeddings:
        _trunc(model.output.weight, std)


def init_olmo(model: nn.Module) -> None:
    """OLMo's "mitchell" init: in-projections 1/sqrt(fan_in), output projections also divided by
    sqrt(2 (layer + 1)), embeddings 1/sqrt(dim); everything truncated at 3 sigma."""
    _init_olmo_embeddings(model, 1.0 / math.sqrt(model.args.dim))
    for layer_id, block in _blocks(model):
        attn, ffn = block.attention, block.feed_forward
        for lin in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
            _trunc(lin.weight, 1.0 / math.sqrt(lin.in_features))
        for lin in (attn.wo, ffn.w2):
            _trunc(lin.weight, 1.0 / math.sqrt(2 * lin.in_features * (layer_id + 1)))
        _reset_norms(block)
    if model.norm is not None:
        model.norm.reset_parameters()


def init_olmo2(model: nn.Module) -> None:
    """OLMo 2: every weight N(0, init_std) truncated at 3 sigma, norms at one."""
    std = model.args.init_std
    _init_olmo_embeddings(model, std)
    for _, block in _blocks(model):
        attn, ffn = block.attention, block.feed_forward
        for lin in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3):
            _trunc(lin.weight, std)
        _reset_norms(block)
    if model.norm is not None:
        model.norm.reset_parameters()


INIT_SCHEMES: dict[str, Callable[[nn.Module], None]] = {"llama": init_llama, "olmo": init_olmo, "olmo2": init_olmo2}
