"""scripts/generate.py's sampling filters (temperature, top-k, top-p) on hand-made logits. Greedy decoding against
transformers: tests/integration/test_generate.py."""
from __future__ import annotations

import os
import sys

import torch

from tests.launch import ROOT


def test_sampling_filters():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from generate import sample_next
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert sample_next(logits, 0.0, 0, 1.0, g) == 1
    assert all(sample_next(logits, 1.0, 1, 1.0, g) == 1 for _ in range(20))  # top-k 1
    assert all(sample_next(logits, 1.0, 0, 0.01, g) == 1 for _ in range(20))  # tiny nucleus
    assert {sample_next(logits, 1.0, 2, 1.0, g) for _ in range(200)} == {1, 2}  # only the top two
