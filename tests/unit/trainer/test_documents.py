"""Document masking: a packed window's logits are those of each document run alone."""
from __future__ import annotations

import pytest
import torch

from torchtitan.models import get_train_spec
from torchtitan.ops import attention
from torchtitan.trainer.documents import document_ids, document_positions
from torchtitan.trainer.step import ModelRunner

EOS = 1


def test_document_ids_and_positions():
    inputs = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 2, 3, 4, 5, 6, 7, 8]])
    docs = document_ids(inputs, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def _model(name: str, **overrides):
    spec = get_train_spec(name)
    args = spec.model_args("debugmodel")
    for k, v in overrides.items():
        setattr(args, k, v)
    torch.manual_seed(0)
    model = spec.build_model(args)
    model.init_weights(seed=0)
    return model.double().eval()


@pytest.mark.parametrize("name,overrides", [("llama3", {}), ("olmo3", {"sliding_window": 5})])
@pytest.mark.parametrize("rope_restart", [False, True])
def test_packed_window_equals_each_document_alone(name, overrides, rope_restart, monkeypatch):
    monkeypatch.setattr(attention, "LOCAL_TILE", 8)  # tiles that documents and windows cross
    model = _model(name, **overrides)
    torch.manual_seed(1)
    lengths = [[9, 14, 1, 16], [40]]
    rows = []
    for row in lengths:
        parts = [torch.cat([torch.randint(2, 2000, (n - 1,)), torch.tensor([EOS])]) for n in row]
        rows.append(torch.cat(parts))
    tokens = torch.stack(rows)
    runner = ModelRunner([model], lambda logits, labels: logits, torch.device("cpu"), document_eos_id=EOS,
                         document_rope_restart=rope_restart)
    _, _, kwargs = runner._prepare(tokens, tokens)
    # Restarted positions give each document exactly its own computation; window-wide positions give the same
    # attention scores (RoPE is relative) through a float32 RoPE table at other angles.
    tol = 1e-9 if rope_restart else 1e-6
    with torch.no_grad():
        packed = model(tokens, **kwargs)
        plain = model(tokens)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(tokens[b:b + 1, start:start + n])
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, atol=tol, rtol=tol)
                start += n
    # Without masking, later documents see earlier ones: the logits differ.
    assert not torch.allclose(packed[0, 9:], plain[0, 9:])
    torch.testing.assert_close(packed[0, :9], plain[0, :9])
