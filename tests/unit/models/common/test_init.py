"""Initial weights (models/common/init.py): the same seed gives the same weights, also when the model is built
on the meta device and materialized, and initialization keeps tied weights tied."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from torchtitan.models.common.decoder import Decoder
from torchtitan.models.llama3 import llama3_flavors
from torchtitan.models.olmo import olmo_flavors
from torchtitan.models.olmo2 import olmo2_flavors

FLAVORS = {"llama3": llama3_flavors, "olmo": olmo_flavors, "olmo2": olmo2_flavors}


def _init_twice(args) -> list:
    """The same seed, built on meta and materialized twice: the state dicts, each after its checks."""
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.device("meta"):
            m = Decoder(args)
        m.to_empty(device="cpu")
        m.init_weights(buffer_device="cpu")
        if args.tie_word_embeddings:
            assert m.output.weight is m.tok_embeddings.weight
        assert not any("rope" in k for k in m.state_dict())
        states.append(m.state_dict())
    return states


@pytest.mark.parametrize("family,tied", [("llama3", False), ("olmo", True), ("olmo2", True)])
def test_meta_init_is_deterministic_and_keeps_tying(family, tied):
    args = dataclasses.replace(FLAVORS[family]["debugmodel"], n_layers=2, tie_word_embeddings=tied)
    first, second = _init_twice(args)
    for k in first:
        assert torch.equal(first[k], second[k]), k
