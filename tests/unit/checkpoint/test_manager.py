"""CheckpointManager in one process on a tiny Llama: selection, retention, export dtypes, async, bad folders."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.checkpoint import CheckpointError, CheckpointManager, ModelInfo, ModelWrapper
from torchtitan.checkpoint.io import MARKER, read_dcp_metadata, read_marker, step_folders
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config.job_config import Checkpoint, LRScheduler, Optimizer
from torchtitan.models.common.decoder import Decoder as Transformer
from torchtitan.models.llama3 import LlamaModelArgs
from torchtitan.trainer.state import TrainState

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ARGS = LlamaModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)


class Counter(Stateful):
    """Stands in for the dataloader: a position that must come back exactly."""

    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


def build(tmp_path, args: LlamaModelArgs = ARGS, dtype=torch.float32, seed: int = 0, total_steps: int = 8, **ckpt):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device="cpu")
    model.to(dtype)
    opt = build_optimizers([model], Optimizer(lr=1e-2), "cpu")
    sched = build_lr_schedulers(opt, LRScheduler(warmup_steps=2), total_steps)
    state = TrainState()
    cfg = Checkpoint(**{"enable": True, "interval": 2, **ckpt})
    states = {"model": ModelWrapper([model]), "optimizer": opt, "lr_scheduler": sched, "dataloader": Counter(),
              "train_state": state}
    mgr = CheckpointManager(cfg, str(tmp_path), states, total_steps, model=ModelInfo("llama3", None, args))
    return mgr, model, opt, sched, states


def step(model, opt, sched, states, n: int = 1) -> None:
    for _ in range(n):
        x = torch.randint(0, model.args.vocab_size, (2, 8))
        model(x).float().logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        states["dataloader"].pos += 1
        states["train_state"].step += 1


def train_and_save(tmp_path, steps: list[int], **ckpt):
    mgr, model, opt, sched, states = build(tmp_path, **ckpt)
    for s in steps:
        step(model, opt, sched, states, s - states["train_state"].step)
        mgr.save(s, last=(s == mgr.total_steps))
    mgr.close()
    return model, states


def listing(root) -> dict[str, list[str]]:
    return {dp: sorted(fs) for dp, _, fs in os.walk(root)}


def test_resume_restores_everything_and_skips_incomplete(tmp_path, caplog):
    model, states = train_and_save(tmp_path, [2, 4])
    broken = tmp_path / "checkpoint" / "step-6"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"half a save")
    mgr, model2, opt2, _, states2 = build(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING, logger="torchtitan"):
        assert mgr.load() == 4
    assert "step-6 is incomplete" in caplog.text
    assert states2["dataloader"].pos == 4 and states2["train_state"].step == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert opt2.optimizers[0].state_dict()["state"][0]["step"] == 4
    assert mgr.loaded_path.endswith("step-4")


def test_load_step_and_refusal_to_overwrite_newer(tmp_path):
    train_and_save(tmp_path, [2, 4])
    mgr, *_ = build(tmp_path, load_step=3)
    with pytest.raises(CheckpointError,
                       match=r"load_step = 3: no complete checkpoint .*step-3 \(complete steps: 2, 4\)"):
        mgr.load()
    mgr, *_ = build(tmp_path, load_step=2)
    with pytest.raises(CheckpointError, match="newer complete checkpoints \\(steps 4\\)"):
        mgr.load()
    mgr, *_ = build(tmp_path, load_step=2, total_steps=3)  # never reaches step 4: allowed
    assert mgr.load() == 2


def test_keep_latest_k_keeps_newest_seed_and_export(tmp_path):
    mgr, model, opt, sched, states = build(tmp_path, keep_latest_k=2)
    mgr.save_seed()
    for s in (2, 4, 6, 8):
        step(model, opt, sched, states, 2)
        mgr.save(s, last=(s == 8))
    mgr.close()
    kinds = {f.step: read_marker(f.path)["kind"] for f in step_folders(mgr.root)}
    # step-8 is the weights-only export: the full step-4 and step-6 stay, so the run is resumable.
    assert kinds == {0: "seed", 4: "full", 6: "full", 8: "export"}


def test_keep_latest_k_async(tmp_path):
    model, _ = train_and_save(tmp_path, [2, 4, 6], keep_latest_k=1, async_mode="async", last_save_model_only=False)
    assert [f.step for f in step_folders(tmp_path / "checkpoint")] == [6]


@pytest.mark.parametrize("train_dtype,export", [(torch.float32, "float32"), (torch.float32, "bfloat16"),
                                                (torch.float32, "float16"), (torch.bfloat16, "float32")])
def test_last_save_is_weights_only_in_export_dtype(tmp_path, train_dtype, export):
    mgr, model, opt, sched, states = build(tmp_path, dtype=train_dtype, total_steps=4, export_dtype=export)
    for s in (2, 4):
        step(model, opt, sched, states, 2)
        mgr.save(s, last=(s == 4))
    mgr.close()
    root = tmp_path / "checkpoint"
    full, exp = read_dcp_metadata(str(root / "step-2")), read_dcp_metadata(str(root / "step-4"))
    assert {k.split(".")[0] for k in full.state_dict_metadata} == {"model", "optimizer", "lr_scheduler", "dataloader",
                                                                  "train_state"}
    assert {md.properties.dtype for k, md in full.state_dict_metadata.items()
            if k.startswith("model.")} == {train_dtype}
    assert {k.split(".")[0] for k in exp.state_dict_metadata} == {"model"}
    want = getattr(torch, export)
    assert {md.properties.dtype for md in exp.state_dict_metadata.values()} == {want}
    assert read_marker(str(root / "step-4"))["dtype"] == export
    dcp_to_torch_save(str(root / "step-4"), str(tmp_path / "out.pt"))
    sd = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert sd[k].dtype == want and torch.equal(sd[k], v.to(want)), k


def test_dcp_to_torch_of_full_checkpoint_loads_into_model(tmp_path):
    model, _ = train_and_save(tmp_path, [2])
    dcp_to_torch_save(str(tmp_path / "checkpoint" / "step-2"), str(tmp_path / "full.pt"))
    obj = torch.load(tmp_path / "full.pt", weights_only=True)
    assert set(obj) == {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"}
    fresh = Transformer(ARGS)
    fresh.load_state_dict(obj["model"])  # Meta names, strict: no RoPE buffer in the checkpoint
    x = torch.randint(0, ARGS.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert int(obj["train_state"]["step"]) == 2


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_save_snapshots_weights_at_save_time(tmp_path, mode):
    mgr, model, opt, sched, states = build(tmp_path, async_mode=mode, last_save_model_only=False)
    step(model, opt, sched, states, 2)
    mgr.save(2)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, sched, states, 2)  # changes the weights while the write may still run
    mgr.close()
    assert os.path.isfile(tmp_path / "checkpoint" / "step-2" / MARKER)
    mgr2, model2, *_ = build(tmp_path, seed=3)
    assert mgr2.load() == 2
    for k, v in at_save.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_finished_run(tmp_path):
    train_and_save(tmp_path, [2, 4, 6, 8])
    mgr, *_ = build(tmp_path)
    assert mgr.load() == 8  # the final export exists: nothing left to train
    mgr, *_ = build(tmp_path, total_steps=12)
    with pytest.raises(CheckpointError, match="final weights-only export of a finished run"):
        mgr.load()


def test_seed_checkpoint_is_model_only_and_starts_at_zero(tmp_path):
    mgr, model, *_ = build(tmp_path)
    mgr.save_seed()
    assert {k.split(".")[0]
            for k in read_dcp_metadata(str(tmp_path / "checkpoint" / "step-0")).state_dict_metadata} == {"model"}
    mgr2, model2, _, _, states2 = build(tmp_path, seed=5)
    assert mgr2.load() == 0 and states2["train_state"].step == 0
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        mgr2.save_seed()


def test_train_state_rng_round_trip(tmp_path):
    mgr, model, opt, sched, states = build(tmp_path, last_save_model_only=False)
    step(model, opt, sched, states, 2)
    mgr.save(2)
    expected = torch.rand(3)
    mgr2, *_ = build(tmp_path, seed=9)
    mgr2.load()
    assert torch.equal(torch.rand(3), expected)


def test_exclude_from_loading(tmp_path):
    train_and_save(tmp_path, [2, 4])
    mgr, _, opt, _, states = build(tmp_path, exclude_from_loading=["dataloader", "optimizer"])
    assert mgr.load() == 4
    assert states["dataloader"].pos == 0 and not opt.optimizers[0].state
    with pytest.raises(CheckpointError, match="exclude_from_loading: dataset not among"):
        build(tmp_path, exclude_from_loading=["dataset"])


# ------------------------------------------------------------------------ bad input
def _expect_error(tmp_path, match: str, **ckpt):
    before = listing(tmp_path)
    mgr, *_ = build(tmp_path, **ckpt)
    with pytest.raises(CheckpointError, match=match) as e:
        mgr.load()
    assert listing(tmp_path) == before  # nothing overwritten or deleted
    return str(e.value)


def test_initial_load_missing_folder(tmp_path):
    _expect_error(tmp_path, "initial_load_path .*nope: no such folder", initial_load_path=str(tmp_path / "nope"))


def test_initial_load_partial_folder(tmp_path):
    part = tmp_path / "partial"
    part.mkdir()
    (part / "__0_0.distcp").write_bytes(b"x" * 100)
    _expect_error(tmp_path, r"partial has .distcp data but no .metadata: the save was interrupted",
                  initial_load_path=str(part))


def test_initial_load_of_a_checkpoint_root_suggests_a_step(tmp_path):
    train_and_save(tmp_path / "a", [2])
    root = tmp_path / "a" / "checkpoint"
    _expect_error(tmp_path / "b", r"folder of step checkpoints.*step-2", initial_load_path=str(root))


def test_corrupt_metadata(tmp_path):
    train_and_save(tmp_path, [2])
    (tmp_path / "checkpoint" / "step-2" / ".metadata").write_bytes(b"garbage")
    _expect_error(tmp_path, r"step-2: corrupt .metadata")


def test_corrupt_data_file(tmp_path):
    train_and_save(tmp_path, [2])
    data = tmp_path / "checkpoint" / "step-2" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(1000)
    msg = _expect_error(tmp_path, r"checkpoint .*step-2 could not be loaded")
    assert "\n" not in msg


def test_corrupt_marker(tmp_path):
    train_and_save(tmp_path, [2])
    (tmp_path / "checkpoint" / "step-2" / MARKER).write_text("{not json")
    _expect_error(tmp_path, r"step-2: unreadable .complete marker")


def test_other_flavor_names_the_mismatch(tmp_path):
    train_and_save(tmp_path, [2])
    bigger = dataclasses.replace(ARGS, dim=64, n_layers=3)
    before = listing(tmp_path)
    mgr, *_ = build(tmp_path, args=bigger)
    with pytest.raises(CheckpointError) as e:
        mgr.load()
    msg = str(e.value)
    assert "step-2 does not fit this model" in msg and "differ in shape" in msg
    assert "layers.0.attention.wo.weight is [32, 32] in the checkpoint but [64, 64] in the model" in msg
    assert "missing from the checkpoint: layers.2." in msg
    assert listing(tmp_path) == before


def test_fewer_layers_is_an_error_not_a_partial_load(tmp_path):
    train_and_save(tmp_path, [2])
    mgr, *_ = build(tmp_path, args=dataclasses.replace(ARGS, n_layers=1))
    with pytest.raises(CheckpointError, match=r"tensor\(s\) in the checkpoint that the model does not have: layers.1"):
        mgr.load()


def test_manager_marker_records_model_args(tmp_path):
    train_and_save(tmp_path, [2])
    info = json.loads((tmp_path / "checkpoint" / "step-2" / MARKER).read_text())
    assert info["kind"] == "full" and info["model_args"]["dim"] == ARGS.dim
    # The marker names the family, so tools rebuild the model with no --model.
    assert info["model"] == "llama3" and "flavor" in info


def test_initial_load_works_with_checkpointing_off(tmp_path):
    """Asked to start from given weights, a run never silently starts from random ones; it saves nothing."""
    saved, _ = train_and_save(tmp_path / "run", [2])
    mgr, model, *_ = build(tmp_path / "new", seed=1, enable=False,
                           initial_load_path=str(tmp_path / "run" / "checkpoint" / "step-2"))
    assert mgr.load() == 0
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    assert not mgr.should_save(8, last=True) and not (tmp_path / "new").exists()


def test_dcp_load_casts_bf16_export_into_fp32_model(tmp_path):
    train_and_save(tmp_path / "run", [2, 4, 6, 8], export_dtype="bfloat16")
    export = tmp_path / "run" / "checkpoint" / "step-8"
    mgr, model, *_ = build(tmp_path / "new", initial_load_path=str(export))
    assert mgr.load() == 0
    sd = dcp_state(export)
    assert all(model.state_dict()[k].dtype == torch.float32 and torch.equal(model.state_dict()[k].bfloat16(), v)
               for k, v in sd.items())


def dcp_state(path) -> dict:
    meta = read_dcp_metadata(str(path))
    sd = {k[6:]: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.state_dict_metadata.items()}
    dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    return sd
