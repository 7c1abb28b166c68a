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

OLMO_FLAVORS = {"olmo": olmo_flavors, "olmo2": olmo2_flavors}


def test_init_is_deterministic():
    args = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.device("meta"):
            m = Decoder(args)
        m.to_empty(device="cpu")
        m.init_weights(buffer_device="cpu")
        outs.append(m.state_dict())
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


@pytest.mark.parametrize("family", list(OLMO_FLAVORS))
def test_meta_init_is_deterministic_and_keeps_tying(family):
    args = dataclasses.replace(OLMO_FLAVORS[family]["debugmodel"], n_layers=2, tie_word_embeddings=True)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.device("meta"):
            m = Decoder(args)
        m.to_empty(device="cpu")
        m.init_weights(buffer_device="cpu")
        assert m.output.weight is m.tok_embeddings.weight
        assert not any("rope" in k for k in m.state_dict())
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
