"""HF folder I/O (DCP HuggingFace storage), config.json <-> model args."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from torchtitan.checkpoint import CheckpointManager
from torchtitan.checkpoint.formats import hf
from torchtitan.checkpoint.io import CheckpointError, model_args_from_dict, model_args_to_dict
from torchtitan.config.job_config import Checkpoint
from torchtitan.models import get_train_spec
from torchtitan.models.llama3 import Llama3StateDictAdapter, LlamaModelArgs, llama3_flavors

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.randn(4 + i, 3, generator=g) for i in range(5)} | {
        "lm_head.weight": torch.randn(7, 3, generator=g).bfloat16()}


def test_write_read_round_trip_sharded(tmp_path):
    sd = _sd()
    hf.write_hf_state_dict(sd, str(tmp_path), num_shards=3)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    back = hf.read_hf_state_dict(str(tmp_path))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    as_f32 = hf.read_hf_state_dict(str(tmp_path), dtype=torch.float32)
    assert as_f32["lm_head.weight"].dtype == torch.float32


def test_hf_folder_problems_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        hf.hf_weight_files(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        hf.hf_weight_files(str(tmp_path))
    hf.write_hf_state_dict(_sd(), str(tmp_path), num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors but the file"):
        hf.read_hf_state_dict(str(tmp_path))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / hf.INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: unreadable safetensors file"):
        hf.read_hf_state_dict(str(tmp_path))


@pytest.mark.parametrize("flavor", ["debugmodel", "1B", "8B", "70B"])
def test_config_round_trip_recovers_the_flavor(flavor):
    args = llama3_flavors[flavor]
    cfg = json.loads(json.dumps(Llama3StateDictAdapter(args).hf_config(torch.bfloat16)))
    back = Llama3StateDictAdapter.args_from_hf_config(cfg)
    assert get_train_spec("llama3").matching_flavor(back) == flavor
    for f in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "rope_theta", "rope_scaling",
              "norm_eps"):
        assert getattr(back, f) == getattr(args, f), f


def test_config_with_an_unseen_ffn_width_and_transformers4_rope_keys():
    cfg = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 333, "num_hidden_layers": 2,
           "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    args = Llama3StateDictAdapter.args_from_hf_config(cfg)
    assert (get_train_spec("llama3").matching_flavor(args) is None and args.ffn_hidden_dim == 333
            and args.rope_scaling.factor == 32.0 and args.norm_eps == 1e-6)
    with pytest.raises(CheckpointError, match="rope_type 'yarn' is not supported"):
        Llama3StateDictAdapter.args_from_hf_config({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="lacks a field"):
        Llama3StateDictAdapter.args_from_hf_config({"model_type": "llama"})


def test_model_args_survive_the_marker_json():
    args = llama3_flavors["8B"]
    back = model_args_from_dict(LlamaModelArgs, json.loads(json.dumps(model_args_to_dict(args))))
    assert back == args
    with pytest.raises(CheckpointError, match="not fields of LlamaModelArgs"):
        model_args_from_dict(LlamaModelArgs, {"hidden": 3})


def test_should_save_policy(monkeypatch):
    def mgr(**kw):
        return CheckpointManager(Checkpoint(enable=True, **kw), "/nonexistent", {}, total_steps=100)

    m = mgr(interval=10)
    assert [s for s in range(1, 31) if m.should_save(s)] == [10, 20, 30]
    assert m.should_save(7, last=True)
    assert mgr(interval=10, enable_first_step_checkpoint=True).should_save(1)
    m = mgr(interval_type="seconds", interval=60)
    now = [1000.0]
    monkeypatch.setattr("torchtitan.checkpoint.manager.time.monotonic", lambda: now[0])
    m._last_save_time = 1000.0
    assert not m.should_save(1)
    now[0] = 1061.0
    assert m.should_save(2)
    assert not CheckpointManager(Checkpoint(enable=False), "/x", {}, 100).should_save(100, last=True)


def test_args_dataclass_replace_is_not_shared():
    # The marker helpers must never mutate the flavor table they start from.
    before = dataclasses.asdict(llama3_flavors["debugmodel"])
    model_args_from_dict(LlamaModelArgs, {"dim": 8})
    assert dataclasses.asdict(llama3_flavors["debugmodel"]) == before
