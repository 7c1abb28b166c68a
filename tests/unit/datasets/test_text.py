"""Packing and the global window order: what a global batch holds must not depend on the rank count."""
import json

import pytest
import torch

from torchtitan.components.dataloader import build_dataloader
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config.batch import BatchPlan
from torchtitan.config.job_config import Data
from torchtitan.datasets.text import DocumentSource, PackedWindows
from torchtitan.distributed.fault_tolerance import SingleGroup
from torchtitan.train import DEFAULT_TOKENIZER


def fake_encode(texts):
    return [[int(w) for w in t.split()] + [0] for t in texts]  # 0 plays EOS


def source_of(docs, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return DocumentSource("local", str(path), "text")


DOCS = [" ".join(str(i * 10 + j + 1) for j in range(n)) for i, n in enumerate([5, 3, 9, 2, 7, 4, 6, 8, 1, 5])]


def test_packing_crosses_documents_with_eos(tmp_path):
    ds = PackedWindows(source_of(DOCS, tmp_path), fake_encode, seq_len=4, local_batch_size=1, dp_rank=0, dp_degree=1,
                       infinite=False)
    items = list(ds)
    stream = [t for d in fake_encode(DOCS) for t in d]
    windows = [stream[i * 5:(i + 1) * 5] for i in range(len(stream) // 5)]
    assert [it["input"].tolist() + it["label"][-1:].tolist() for it in items] == windows
    for it in items:
        assert torch.equal(it["input"][1:], it["label"][:-1])  # labels are inputs shifted by one


def global_batches(tmp_path, dp, local_bs, n_batches):
    """Concatenate every rank's share per global micro-batch."""
    per_rank = []
    for r in range(dp):
        ds = PackedWindows(source_of(DOCS * 5, tmp_path), fake_encode, 4, local_bs, r, dp)
        it = iter(ds)
        per_rank.append([[next(it)["input"].tolist() for _ in range(local_bs)] for _ in range(n_batches)])
    return [sum((per_rank[r][b] for r in range(dp)), []) for b in range(n_batches)]


def test_global_batches_independent_of_rank_count(tmp_path):
    one = global_batches(tmp_path, 1, 4, 6)
    assert global_batches(tmp_path, 2, 2, 6) == one
    assert global_batches(tmp_path, 4, 1, 6) == one


def test_epochs_loop(tmp_path, caplog):
    ds = PackedWindows(source_of(DOCS, tmp_path), fake_encode, 4, 1, 0, 1)
    it = iter(ds)
    for _ in range(30):
        next(it)
    assert ds.state_dict()["epoch"] >= 1


def loader(tmp_path, dp_rank, dp, local_bs):
    data = Data(dataset="local", dataset_path=str(tmp_path / "d.jsonl"))
    tok = type("T", (), {"encode_batch": staticmethod(lambda texts, bos, eos: fake_encode(texts))})()
    return build_dataloader(data, BatchPlan(local_batch_size=local_bs, seq_len=4, dp=dp), tok, dp_rank=dp_rank,
                            dump_folder=str(tmp_path), seed=0, groups=SingleGroup(str(tmp_path)))


def test_dataloader_resume_and_reshard(tmp_path):
    source_of(DOCS * 5, tmp_path)
    ref = loader(tmp_path, 0, 1, 4)
    ref_it = iter(ref)
    ref_batches = [next(ref_it)[0]["input"] for _ in range(6)]

    first = loader(tmp_path, 0, 1, 4)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    # Resume on 2 ranks with the same global batch: each takes its half of the next global batches.
    halves = []
    for r in range(2):
        dl = loader(tmp_path, r, 2, 2)
        dl.load_state_dict(state)
        rit = iter(dl)
        halves.append([next(rit)[0]["input"] for _ in range(3)])
    for b in range(3):
        assert torch.equal(torch.cat([halves[0][b], halves[1][b]]), ref_batches[3 + b])


def test_resume_with_other_global_batch_is_an_error(tmp_path):
    source_of(DOCS * 5, tmp_path)
    first = loader(tmp_path, 0, 1, 4)
    it = iter(first)
    next(it)
    state = first.state_dict()
    other = loader(tmp_path, 0, 1, 3)
    with pytest.raises(ValueError, match="not a multiple of the global micro-batch 3"):
        other.load_state_dict(state)
        next(iter(other))


def test_pydoc_corpus_with_bundled_tokenizer():
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    loader = build_dataloader(Data(dataset="pydoc"), BatchPlan(local_batch_size=2, seq_len=32, dp=1), tok, dp_rank=0,
                              dump_folder="/tmp", seed=0, groups=SingleGroup("/tmp"))
    batch, labels = next(iter(loader))
    assert batch["input"].shape == (2, 32) and labels.shape == (2, 32)
    assert batch["input"][0, 0].item() == tok.bos_id
    assert int(batch["input"].max()) < 2048


def test_resume_inside_a_long_document(tmp_path):
    """The saved position is exact while one document is still being cut into windows."""
    docs = [" ".join(str(i) for i in range(1, 200)), "7 8 9"]
    src = source_of(docs, tmp_path)
    ref = [w["input"].tolist() for w in PackedWindows(src, fake_encode, 4, 2, 0, 1, infinite=False)]
    ds = PackedWindows(src, fake_encode, 4, 2, 0, 1, infinite=False)
    it = iter(ds)
    head = [next(it)["input"].tolist() for _ in range(6)]
    state = ds.state_dict()
    assert state["doc_index"] == 1 and len(state["buffer"]) == 200 - 6 * 5
    resumed = PackedWindows(src, fake_encode, 4, 2, 0, 1, infinite=False)
    resumed.load_state_dict(state)
    assert head + [w["input"].tolist() for w in resumed] == ref
