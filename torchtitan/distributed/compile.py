"""torch.compile per transformer block: small graphs compile fast and are reused across blocks."""
from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Whole-graph compile of every block, except around an attention core that must run eagerly (context
    parallel's ring sends messages from inside its autograd.Function): one graph break there."""
    for name, block in list(model.layers.items()):
        # Eager pieces: a context-parallel ring (messages inside an autograd.Function), MoE dispatch (host sync).
        eager_core = not block.attention.sdpa.traceable or block.feed_forward.is_moe
        model.layers[name] = torch.compile(block, fullgraph=not eager_core)
