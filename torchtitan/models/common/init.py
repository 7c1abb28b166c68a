"""Initial weights, one scheme per family, chosen by `args.init`, the same on every layout.

Every parameter draws from its own generator, seeded by (seed, parameter name), so the weights do not
depend on the order parameters are visited, on which pipeline stage holds them, or on how FSDP, TP or
CP shard them: one process and any mesh start from the same weights without a seed checkpoint. A sharded
parameter (DTensor) is drawn whole, one parameter at a time (never more than one layer's worth of memory
at once), and each rank keeps its own slice without any communication. Modules a pipeline stage does not
own are None and skipped. Norm weights are reset to ones (non-parametric norms have none).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that activation checkpointing and torch.compile put around blocks: not part of a parameter's name.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: a function of the run's seed and the parameter's name only."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ParameterInit:
    """Draws each parameter from its own (seed, name) generator; sharded parameters keep their slice."""

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            if name == "output.weight" and tied_copy(model):
                name = "tok_embeddings.weight"  # the last pipeline stage's copy of a tied embedding draws as it
            self.names.setdefault(id(p), name)  # a tied weight keeps its first (embedding) name

    def _fill(self, p: torch.Tensor, draw: Callable[[torch.Tensor, torch.Generator], None]) -> None:
        local = p.to_local() if isinstance(p, DTensor) else p
        generator = torch.Generator(device=local.device).manual_seed(parameter_seed(self.seed, self.names[id(p)]))
        if not isinstance(p, DTensor):
            draw(p, generator)
            return
        full = torch.empty(p.shape, dtype=p.dtype, device=local.device)
        draw(full, generator)
        # src_data_rank=None: every rank holds the same full tensor and slices its shard locally.
        local.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())

    def trunc_normal(self, p: torch.Tensor, std: float, cutoff: float | None = None) -> None:
        """N(0, std) truncated at +-cutoff x std (None: torch's default absolute cutoff of +-2)."""
        bounds = {} if cutoff is None else {"a": -cutoff * std, "b": cutoff * std}
        self._fill(p, lambda t, g: nn.init.trunc_normal_(t, mean=0.0, std=std, generator=g, **bounds))

    def normal(self, p: torch.Tensor, std: float = 1.0) -> None:
        self._fill(p, lambda t, g: nn.init.normal_(t, mean=0.0, std=std, generator=g))


def tied_copy(model: nn.Module) -> bool:
    """A pipeline stage holding the output but not the embedding of a model that ties them: its output is a
    copy of the embedding (distributed/pipeline.py keeps the two equal), initialized as the embedding is."""
    return model.args.tie_word_embeddings and model.tok_embeddings is None and model.output is not None


def _reset_norms(block: nn.Module) -> None:
    for norm in block.norms():
        norm.reset_parameters()


def _blocks(model: nn.Module):
    return [(int(i), b) for i, b in model.layers.items()]


def init_llama(model: nn.Module, draw: ParameterInit) -> None:
    """torchtitan's Llama init: embedding N(0, 1), in-projections N(0, init_std) truncated at +-2, output
    projections of each block scaled by depth (1 / sqrt(2 (layer + 1))), output layer dim^-0.5 at 3 sigma."""
    a = model.args
    if model.tok_embeddings is not None:
        draw.normal(model.tok_embeddings.weight)
    for layer_id, block in _blocks(model):
        depth = (layer_id + 1) if a.depth_init else a.n_layers
        out_std = 0.02 / (2 * depth) ** 0.5
        _reset_norms(block)
        attn, ffn = block.attention.projections(), block.feed_forward.projections()
        for w in (*attn["in"], *ffn["w1"], *ffn["router"]):
            draw.trunc_normal(w, a.init_std)
        for w in (*attn["out"], *ffn["w2"], *ffn["w3"]):
            draw.trunc_normal(w, out_std)
    if model.norm is not None:
        model.norm.reset_parameters()
    if tied_copy(model):
        draw.normal(model.output.weight)
    elif model.output is not None:
        draw.trunc_normal(model.output.weight, a.dim ** -0.5, cutoff=3)


def _init_olmo_embeddings(model: nn.Module, draw: ParameterInit, std: float) -> None:
    if model.tok_embeddings is not None:
        draw.trunc_normal(model.tok_embeddings.weight, std, cutoff=3)
    if model.output is not None and (not model.args.tie_word_embeddings or tied_copy(model)):
        draw.trunc_normal(model.output.weight, std, cutoff=3)


def init_olmo(model: nn.Module, draw: ParameterInit) -> None:
    """OLMo's "mitchell" init: in-projections 1/sqrt(fan_in), output projections also divided by
    sqrt(2 (layer + 1)), embeddings 1/sqrt(dim); everything truncated at 3 sigma."""
    _init_olmo_embeddings(model, draw, 1.0 / math.sqrt(model.args.dim))
    for layer_id, block in _blocks(model):
        attn, ffn = block.attention.projections(), block.feed_forward.projections()
        # fan_in: the last dim of an (out, in) matrix, also of an (E, out, in) expert stack
        for w in (*attn["in"], *ffn["w1"], *ffn["w3"], *ffn["router"]):
            draw.trunc_normal(w, 1.0 / math.sqrt(w.shape[-1]), cutoff=3)
        for w in (*attn["out"], *ffn["w2"]):
            draw.trunc_normal(w, 1.0 / math.sqrt(2 * w.shape[-1] * (layer_id + 1)), cutoff=3)
        _reset_norms(block)
    if model.norm is not None:
        model.norm.reset_parameters()


def init_olmo2(model: nn.Module, draw: ParameterInit) -> None:
    """OLMo 2: every weight N(0, init_std) truncated at 3 sigma, norms at one."""
    std = model.args.init_std
    _init_olmo_embeddings(model, draw, std)
    for _, block in _blocks(model):
        roles = {**block.attention.projections(), **block.feed_forward.projections()}
        for w in (w for ws in roles.values() for w in ws):
            draw.trunc_normal(w, std, cutoff=3)
        _reset_norms(block)
    if model.norm is not None:
        model.norm.reset_parameters()


INIT_SCHEMES: dict[str, Callable[[nn.Module, ParameterInit], None]] = {
    "llama": init_llama, "olmo": init_olmo, "olmo2": init_olmo2}
