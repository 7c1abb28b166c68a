"""Config dtype names and the torch dtypes they mean (one table for training, export and conversion)."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
