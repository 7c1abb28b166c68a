"""Memmap data: instances, label masks, a global order independent of the rank count, resumable anywhere."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_sum
from torchtitan.config.job_config import Data
from torchtitan.datasets.memmap import (
    MemmapInstances,
    build_global_indices,
    build_memmap_dataset,
    global_batch_instances,
)

SEQ = 8


def write_tokens(folder, sizes=(61, 40, 7, 33), dtype=np.uint16, masks=False) -> tuple[list[str], list[str]]:
    """Token files whose ids encode (file, position) so every instance is recognizable."""
    paths, mask_paths = [], []
    for f, n in enumerate(sizes):
        ids = (np.arange(n) + 1000 * (f + 1)).astype(dtype)
        paths.append(str(folder / f"part-{f}.npy"))
        ids.tofile(paths[-1])
        if masks:
            mask_paths.append(str(folder / f"part-{f}.mask.npy"))
            (np.arange(n) % 3 != 0).astype(np.bool_).tofile(mask_paths[-1])
    return paths, mask_paths


@dataclasses.dataclass
class MemmapRun:
    """What build_memmap_dataset is given: the [data] section and the run's batch numbers."""

    data: Data
    seq_len: int = SEQ
    local_batch_size: int = 2
    global_batch_size: int = -1
    seed: int = 7


def training_cfg(paths, **kw) -> MemmapRun:
    data_keys = {f.name for f in dataclasses.fields(Data)}
    data = Data(dataset="memmap", memmap_paths=paths, **{k: v for k, v in kw.items() if k in data_keys})
    return MemmapRun(data, **{k: v for k, v in kw.items() if k not in data_keys})


def dataset(cfg: MemmapRun, rank: int, dp: int, dump: str):
    return build_memmap_dataset(cfg.data, seq_len=cfg.seq_len, local_batch_size=cfg.local_batch_size,
                                global_batch_size=cfg.global_batch_size, seed=cfg.seed, dp_rank=rank, dp_degree=dp,
                                dump_folder=dump)


def loaders(cfg: MemmapRun, dp: int, dump: str) -> list[ParallelAwareDataloader]:
    return [ParallelAwareDataloader(dataset(cfg, r, dp, dump), cfg.local_batch_size, dp) for r in range(dp)]


def consume(loaders_: list, micro_batches: int, iters=None) -> list[list[int]]:
    """Per micro-batch, the first token of every sequence in global order (rank 0's slice first)."""
    iters = iters if iters is not None else [iter(dl) for dl in loaders_]
    out = []
    for _ in range(micro_batches):
        seqs = []
        for it in iters:
            batch, _ = next(it)
            seqs += batch["input"][:, 0].tolist()
        out.append(seqs)
    return out


def test_instances_are_cut_within_each_file(tmp_path):
    paths, _ = write_tokens(tmp_path)
    inst = MemmapInstances(paths, "uint16", SEQ)
    assert len(inst) == 61 // SEQ + 40 // SEQ + 0 + 33 // SEQ  # 7 + 5 + 0 + 4: remainders dropped, short file skipped
    assert inst.tokens(0).tolist() == list(range(1000, 1008))
    assert inst.tokens(7).tolist() == list(range(2000, 2008))  # first instance of the second file
    assert inst.tokens(12).tolist() == list(range(4000, 4008))  # the 7-token file has none
    f, off = inst.locate(15)
    assert (os.path.basename(f.path), off) == ("part-3.npy", 24)
    item = inst.item(0)
    assert item["input"].tolist() == list(range(1000, 1008))
    assert item["label"].tolist() == list(range(1001, 1008)) + [IGNORE_INDEX]  # no next token inside the instance


def test_label_mask_ignores_masked_labels_and_the_loss_skips_them(tmp_path):
    paths, masks = write_tokens(tmp_path, masks=True)
    inst = MemmapInstances(paths, "uint16", SEQ, masks)
    item = inst.item(1)  # tokens 1008..1015 of file 0; mask False where position % 3 == 0
    expect = [t + 1 if (t + 1 - 1000) % 3 != 0 else IGNORE_INDEX for t in range(1008, 1015)] + [IGNORE_INDEX]
    assert item["label"].tolist() == expect
    # The loss of masked labels is exactly the loss over the unmasked ones.
    logits = torch.randn(1, SEQ, 5000)
    keep = item["label"] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[0][keep], item["label"][keep], reduction="sum")
    assert torch.allclose(cross_entropy_sum(logits, item["label"][None]), manual)


def test_mask_file_must_match_token_file(tmp_path):
    paths, masks = write_tokens(tmp_path, masks=True)
    np.ones(5, dtype=np.bool_).tofile(masks[1])
    with pytest.raises(ValueError, match="one bool byte per token"):
        MemmapInstances(paths, "uint16", SEQ, masks)
    with pytest.raises(ValueError, match="one mask file per token file"):
        MemmapInstances(paths, "uint16", SEQ, masks[:2])


def test_order_depends_only_on_seed_epoch_size():
    a, b = build_global_indices(100, 7, 0), build_global_indices(100, 7, 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(100)) and a.dtype == np.uint32
    assert not np.array_equal(a, build_global_indices(100, 7, 1))
    assert not np.array_equal(a, build_global_indices(100, 8, 0))
    # numpy's PCG64(seed + epoch) shuffle, as OLMo draws it.
    ref = np.arange(100, dtype=np.uint32)
    np.random.Generator(np.random.PCG64(8)).shuffle(ref)
    assert np.array_equal(build_global_indices(100, 7, 1), ref)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_batches_identical_across_rank_counts(tmp_path, dp):
    paths, _ = write_tokens(tmp_path, sizes=(400, 300))
    # Global batch 8 sequences: dp=1 accumulates 4 micro-batches of 2, dp=4 takes one micro-batch.
    cfg = training_cfg(paths, global_batch_size=8)
    dump = str(tmp_path / f"run{dp}")
    micro = consume(loaders(cfg, dp, dump), micro_batches=6 * 4 // dp)
    per_step = [sum(micro[i:i + 4 // dp], []) for i in range(0, len(micro), 4 // dp)]
    inst = MemmapInstances(paths, "uint16", SEQ)
    order = np.fromfile(os.path.join(dump, "global_indices.npy"), dtype=np.uint32)  # raw uint32, OLMo's format
    assert np.array_equal(order, build_global_indices(len(inst), 7, 0))
    expected = [[int(inst.tokens(int(i))[0]) for i in order[s * 8:(s + 1) * 8]] for s in range(6)]
    assert per_step == expected
    meta = json.load(open(os.path.join(dump, "data_order.json")))
    assert meta["num_instances"] == len(inst) and meta["seed"] == 7


def test_resume_on_a_different_rank_count_continues_the_order(tmp_path):
    paths, _ = write_tokens(tmp_path, sizes=(400, 300))
    cfg = training_cfg(paths, global_batch_size=8)
    reference = consume(loaders(cfg, 1, str(tmp_path / "ref")), micro_batches=6 * 4)
    # 2 ranks train 2 steps (4 micro-batches of 2 x 2), checkpoint...
    run = str(tmp_path / "run")
    two = loaders(cfg, 2, run)
    iters = [iter(dl) for dl in two]
    first = consume(two, 4, iters)
    states = [dl.state_dict() for dl in two]
    assert states[0] == states[1]  # global progress: the same blob on every rank
    # ...then 4 ranks resume from rank 0's state.
    four = loaders(cfg, 4, run)
    for dl in four:
        dl.load_state_dict(states[0])
    rest = consume(four, 4)
    flat = lambda mbs: sum(mbs, [])  # noqa: E731
    assert flat(first) + flat(rest) == flat(reference)  # 16 + 32 sequences


def test_epochs_roll_over_with_a_new_permutation(tmp_path):
    paths, _ = write_tokens(tmp_path, sizes=(8 * 10,))  # 10 instances; global batch 4 -> 2 batches/epoch, 2 dropped
    cfg = training_cfg(paths, global_batch_size=4)
    dump = str(tmp_path / "run")
    micro = consume(loaders(cfg, 2, dump), micro_batches=6)
    order0, order1 = build_global_indices(10, 7, 0), build_global_indices(10, 7, 1)
    first = lambda i: 1000 + 8 * int(i)  # noqa: E731
    assert micro[:2] == [[first(i) for i in order0[0:4]], [first(i) for i in order0[4:8]]]
    assert micro[2:4] == [[first(i) for i in order1[0:4]], [first(i) for i in order1[4:8]]]
    assert os.path.isfile(os.path.join(dump, "global_indices_epoch1.npy"))
    epoch, ids = global_batch_instances(dataset(cfg, 0, 2, dump).order, 4, 3)
    assert epoch == 1 and ids.tolist() == order1[4:8].tolist()


def test_fingerprint_mismatch_on_resume_is_an_error_unless_ignored(tmp_path):
    paths, _ = write_tokens(tmp_path, sizes=(400, 300))
    cfg = training_cfg(paths, global_batch_size=4)
    (dl,) = loaders(cfg, 1, str(tmp_path / "run"))
    it = iter(dl)
    next(it)
    state = dl.state_dict()
    # The second file grows (new data appended): resuming silently would change the order.
    np.arange(320, dtype=np.uint16).tofile(paths[1])
    fresh = ParallelAwareDataloader(dataset(cfg, 0, 1, str(tmp_path / "fresh")), 2, 1)
    fresh.load_state_dict(state)  # StatefulDataLoader applies the state when iteration starts
    with pytest.raises(ValueError, match=r"part-1.npy: 300 -> 320 tokens"):
        next(iter(fresh))
    with pytest.raises(ValueError, match="data_order_ignore_fingerprint"):
        dataset(cfg, 0, 1, str(tmp_path / "run"))  # the run folder's order is for the old files
    ignoring = training_cfg(paths, global_batch_size=4, data_order_ignore_fingerprint=True)
    resumed = ParallelAwareDataloader(dataset(ignoring, 0, 1, str(tmp_path / "run")), 2, 1)
    resumed.load_state_dict(state)
    next(iter(resumed))


def test_resume_rejects_a_position_inside_a_micro_batch(tmp_path):
    paths, _ = write_tokens(tmp_path, sizes=(400, 300))
    (dl,) = loaders(training_cfg(paths, local_batch_size=2), 1, str(tmp_path / "run"))
    next(iter(dl))
    state = dl.state_dict()  # 2 instances consumed
    four = training_cfg(paths, local_batch_size=4)
    (resumed,) = loaders(four, 1, str(tmp_path / "run"))
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple of the global micro-batch 4"):
        next(iter(resumed))


def test_config_errors_name_the_key(tmp_path):
    paths, _ = write_tokens(tmp_path)
    with pytest.raises(ValueError, match="memmap_paths.*no such file"):
        MemmapInstances([str(tmp_path / "missing.npy")], "uint16", SEQ)
    np.arange(3, dtype=np.uint8).tofile(tmp_path / "odd.npy")
    with pytest.raises(ValueError, match="memmap_dtype"):
        MemmapInstances([str(tmp_path / "odd.npy")], "uint16", SEQ)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dataset(training_cfg(paths, global_batch_size=64), 0, 1, str(tmp_path / "run"))
