"""Meta's Llama checkpoint layout (checkpoint/formats/meta.py): every parameter has a shard rule, and the
embedding is merged along the dimension it was split on. The conversion script end to end:
tests/integration/test_conversions.py."""
from __future__ import annotations

import torch

from torchtitan.models.common.decoder import Decoder as Transformer
from torchtitan.models.llama3 import llama3_flavors


def test_every_parameter_has_a_meta_layout_rule():
    from torchtitan.checkpoint.formats.meta import SHARD_DIM

    with torch.device("meta"):
        keys = Transformer(llama3_flavors["debugmodel"]).state_dict().keys()
    for k in keys:
        assert k == "tok_embeddings.weight" or any(p.fullmatch(k) for p, _ in SHARD_DIM), k


def test_meta_llama2_embedding_is_split_on_dim_1():
    from torchtitan.checkpoint.formats.meta import merge_shards

    emb = torch.randn(10, 8)
    shards = [{"tok_embeddings.weight": emb[:, :4], "norm.weight": torch.ones(8)},
              {"tok_embeddings.weight": emb[:, 4:], "norm.weight": torch.ones(8)}]
    assert torch.equal(merge_shards(shards, {"dim": 8}, "x")["tok_embeddings.weight"], emb)
    shards = [{"tok_embeddings.weight": emb[:5]}, {"tok_embeddings.weight": emb[5:]}]  # Llama 3 VocabParallel
    assert torch.equal(merge_shards(shards, {"dim": 8}, "x")["tok_embeddings.weight"], emb)
