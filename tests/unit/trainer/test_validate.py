"""Validation in one process: the loss per labelled token of a fixed set, forward only, train mode restored."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_sum
from torchtitan.config.job_config import Data, Parallelism, Validation
from torchtitan.datasets.memmap import MemmapInstances, SequentialInstances
from torchtitan.datasets.text import pydoc_documents
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.tools.errors import ConfigError
from torchtitan.trainer.step import ModelRunner
from torchtitan.trainer.validate import Validator, validation_sets


def _model():
    spec = get_train_spec("llama3")
    args = spec.model_args("debugmodel")
    args.n_layers, args.max_seq_len = 2, 16
    model = spec.build_model(args)
    model.init_weights(seed=0)
    return model


def test_sequential_instances_split_global_batches_and_drop_the_tail(tmp_path):
    path = tmp_path / "tokens.npy"
    np.arange(11 * 8, dtype=np.uint16).tofile(path)  # 11 instances of 8 tokens
    inst = MemmapInstances([str(path)], "uint16", 8)
    shares = [[int(x["input"][0]) // 8 for x in SequentialInstances(inst, 2, r, 2)] for r in range(2)]
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]  # global batches of 4; instances 8-10 do not fill one


def test_memmap_validation_is_the_mean_loss_of_the_set_and_leaves_train_mode(tmp_path):
    path = tmp_path / "val.npy"
    rng = np.random.default_rng(0)
    rng.integers(0, 2048, size=7 * 16, dtype=np.uint16).tofile(path)  # 7 instances of 16 tokens
    model = _model()
    dims = ParallelDims.from_config(Parallelism(), 1)
    cfg = Validation(enable=True, dataset="memmap", dataset_path=str(path), seq_len=16, local_batch_size=3, steps=-1)
    runner = ModelRunner([model], cross_entropy_sum, torch.device("cpu"))
    (result,) = Validator(cfg, (16, 3), Data(), None, dims, total_steps=10).run(runner)

    inst = MemmapInstances([str(path)], "uint16", 16)
    items = [inst.item(i) for i in range(6)]  # two whole batches of 3; the 7th instance is left out
    inputs, labels = torch.stack([x["input"] for x in items]), torch.stack([x["label"] for x in items])
    with torch.no_grad():
        want = float(cross_entropy_sum(model(inputs), labels)) / int((labels != IGNORE_INDEX).sum())
    assert result.tokens == 6 * 15 and abs(result.loss - want) < 1e-6
    assert model.training and all(p.grad is None for p in model.parameters())
    assert Validator(cfg, (16, 3), Data(), None, dims, total_steps=10).due(10)


def test_steps_bounds_the_batches(tmp_path):
    path = tmp_path / "val.npy"
    np.zeros(9 * 16, dtype=np.uint16).tofile(path)
    dims = ParallelDims.from_config(Parallelism(), 1)
    cfg = Validation(enable=True, dataset="memmap", dataset_path=str(tmp_path), seq_len=16, local_batch_size=2, steps=2)
    (result,) = Validator(cfg, (16, 2), Data(), None, dims, 10).run(ModelRunner([_model()], cross_entropy_sum,
                                                                       torch.device("cpu")))
    assert result.tokens == 2 * 2 * 15


def test_named_sets_each_give_their_own_loss_under_their_name(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        rng.integers(0, 2048, size=6 * 16, dtype=np.uint16).tofile(tmp_path / f"{name}.npy")
    dims = ParallelDims.from_config(Parallelism(), 1)
    runner = ModelRunner([_model()], cross_entropy_sum, torch.device("cpu"))
    alone = {n: Validator(Validation(enable=True, dataset="memmap", dataset_path=str(tmp_path / f"{n}.npy")),
                          (16, 3), Data(), None, dims, 10).run(runner)[0].loss for n in ("a", "b")}
    cfg = Validation(enable=True, sets=[f"first=memmap:{tmp_path / 'a.npy'}", f"second=memmap:{tmp_path / 'b.npy'}"])
    got = Validator(cfg, (16, 3), Data(), None, dims, 10).run(runner)
    assert [(r.name, r.loss) for r in got] == [("first", alone["a"]), ("second", alone["b"])]
    assert alone["a"] != alone["b"]


@pytest.mark.parametrize("entry,match", [("noequals", "write NAME=DATASET"), ("=x", "write NAME=DATASET")])
def test_bad_set_entries_are_one_line(entry, match):
    with pytest.raises(ConfigError, match=match):
        validation_sets(Validation(sets=[entry]))
    with pytest.raises(ConfigError, match="used twice"):
        validation_sets(Validation(sets=["a=pydoc", "a=pydoc_heldout"]))


def test_sets_parse_datasets_paths_and_memmap():
    got = validation_sets(Validation(sets=["held=pydoc_heldout", "wiki=/data/wiki.jsonl", "tok=memmap:/data/t.npy"]))
    assert [(s.name, s.dataset, s.path) for s in got] == [("held", "pydoc_heldout", None),
                                                         ("wiki", "local", "/data/wiki.jsonl"),
                                                         ("tok", "memmap", "/data/t.npy")]
    assert validation_sets(Validation())[0].dataset == "pydoc_heldout"  # the default is held out of training


def test_pydoc_heldout_is_disjoint_from_what_pydoc_trains_on():
    train, held, every = pydoc_documents("train"), pydoc_documents("heldout"), pydoc_documents("all")
    assert len(held) > 20 and not set(train) & set(held)
    chars = sum(map(len, every))
    assert 0.03 * chars < sum(map(len, held)) < 0.07 * chars
    assert all(any(t in doc for doc in every) for t in train + held)  # pieces of the topics, never mixed
