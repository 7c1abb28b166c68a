"""torch.compile per transformer block: small graphs compile fast and are reused across blocks."""
from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=True)
