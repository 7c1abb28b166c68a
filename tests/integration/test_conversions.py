"""HF <-> DCP and Meta -> DCP conversions: logits against transformers, bitwise round trips, bad input.

The scripts run as subprocesses (as users run them); checks run in-process.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.checkpoint_helpers import CONFIG, make_tiny_hf, run_layouts, script
from tests.launch import TINY
from tests.reference import hf_tensors
from torchtitan.checkpoint.io import MARKER, load_model_from_dcp
from torchtitan.models.common.decoder import Decoder as Transformer
from torchtitan.models.llama3 import LlamaModelArgs, llama3_flavors

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def fails(proc, *expected: str) -> str:
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout[-2000:] + err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    for e in expected:
        assert re.search(e, err), (e, err[-2000:])
    return err


def our_model(args: LlamaModelArgs) -> Transformer:
    m = Transformer(args)
    m.init_weights(buffer_device="cpu")
    return m.eval()


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """The tiny HF model saved in several safetensors files with an index (as large models ship)."""
    folder = tmp_path_factory.mktemp("hf") / "sharded"
    model = make_tiny_hf(str(folder), max_shard_size="8MB")
    assert os.path.isfile(folder / "model.safetensors.index.json") and len(list(folder.glob("*.safetensors"))) > 1
    return folder, model


def test_hf_to_dcp_matches_transformers_and_round_trips_bitwise(tmp_path, hf_sharded):
    src, hf_model = hf_sharded
    dcp_dir, back, bf16 = tmp_path / "dcp", tmp_path / "hf_back", tmp_path / "hf_bf16"
    assert "model.flavor debugmodel" in ok(script("convert_hf_to_dcp.py", src, dcp_dir, subprocess=True))
    assert json.loads((dcp_dir / MARKER).read_text())["kind"] == "converted"

    ours = our_model(llama3_flavors["debugmodel"])
    load_model_from_dcp(str(dcp_dir), ours.state_dict())
    x = torch.randint(0, CONFIG["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(x).logits
        assert (ours(x) - ref).abs().max().item() < 1e-4

    # DCP -> HF: model args come from the marker; tensors and config are the original ones.
    ok(script("convert_dcp_to_hf.py", dcp_dir, back))
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg_a[key] == cfg_b[key], key
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        assert torch.equal(LlamaForCausalLM.from_pretrained(str(back)).eval()(x).logits, ref)

    # Selectable dtype and shard count.
    ok(script("convert_dcp_to_hf.py", dcp_dir, bf16, "--dtype", "bfloat16", "--num-shards", "3"))
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert {v.dtype for v in hf_tensors(bf16).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("family", ["olmo", "olmo2", "olmoe"])
def test_other_families_round_trip_through_their_adapters(tmp_path, family):
    """The scripts are not Llama-only: OLMo's adapter brings its names and config.json (OLMoE's also splits
    each expert stack into one HF tensor per expert, and joins them back)."""
    from torchtitan.models import get_train_spec

    spec = get_train_spec(family)
    args = spec.flavors["debugmodel"]
    torch.manual_seed(0)
    model = spec.build_model(args)
    model.init_weights(buffer_device="cpu")
    adapter = spec.adapter(args)
    src, dcp_dir, back = tmp_path / "hf", tmp_path / "dcp", tmp_path / "back"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in adapter.to_hf(model.state_dict()).items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(adapter.hf_config()))
    assert "model.flavor debugmodel" in ok(script("convert_hf_to_dcp.py", src, dcp_dir))
    fresh = spec.build_model(args)
    fresh.init_weights(buffer_device="cpu")
    load_model_from_dcp(str(dcp_dir), fresh.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    ok(script("convert_dcp_to_hf.py", dcp_dir, back))  # family and args from the marker
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "config.json").read_text())["model_type"] == adapter.hf_model_type


def _meta_split(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's Llama 3 model-parallel layout (fairscale): column-parallel and VocabParallelEmbedding
    split dim 0, row-parallel (wo, w2) split dim 1, norms replicated."""
    shards: list[dict] = [{} for _ in range(n)]
    for k, v in sd.items():
        if re.search(r"(wq|wk|wv|w1|w3)\.weight$|^output\.weight$|^tok_embeddings\.weight$", k):
            parts = v.chunk(n, 0)
        elif re.search(r"(wo|w2)\.weight$", k):
            parts = v.chunk(n, 1)
        else:
            parts = [v] * n
        for i, p in enumerate(parts):
            shards[i][k] = p.clone()
    return shards


META_ARGS = LlamaModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                           ffn_dim_multiplier=1.3, rope_theta=500000.0)


def _write_meta(folder, sd, n_shards):
    os.makedirs(folder)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": False}
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(_meta_split(sd, n_shards)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


def test_meta_shards_to_dcp_to_pt_bitwise(tmp_path):
    torch.manual_seed(0)
    model = our_model(META_ARGS)
    original = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # Meta ships bf16
    meta, out, pt = tmp_path / "meta", tmp_path / "dcp", tmp_path / "out.pt"
    _write_meta(meta, original, n_shards=2)
    ok(script("convert_llama_to_dcp.py", meta, out))
    dcp_to_torch_save(str(out), str(pt))  # what `python -m ...format_utils dcp_to_torch` runs
    merged = torch.load(pt, weights_only=True)["model"]
    assert merged.keys() == original.keys()
    for k, v in original.items():
        assert merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], v), k
    # And it is a valid initial_load_path / step folder for our (fp32) model: weights cast on load.
    fresh = our_model(META_ARGS)
    load_model_from_dcp(str(out), fresh.state_dict())
    assert all(torch.equal(fresh.state_dict()[k].bfloat16(), v) for k, v in original.items())
    assert json.loads((out / MARKER).read_text())["model_args"]["ffn_dim_multiplier"] == 1.3


def test_trainer_starts_from_hf_folder_and_converted_dcp_alike(tmp_path, hf_sharded):
    src, _ = hf_sharded
    dcp_dir = tmp_path / "dcp"
    ok(script("convert_hf_to_dcp.py", src, dcp_dir))
    common = [*TINY, "--training.steps", "1", "--checkpoint.enable_checkpoint", "--checkpoint.interval", "100",
              "--metrics.enable_jsonl=false"]
    out = run_layouts(str(tmp_path), 1, common, {"hf": ["--checkpoint.initial_load_path", str(src)],
                                                 "dcp": ["--checkpoint.initial_load_path", str(dcp_dir)],
                                                 "fresh": []}, "initial_load")
    assert out["hf"]["loss"] == out["dcp"]["loss"]
    assert out["hf"]["loss"] != out["fresh"]["loss"]  # the weights were loaded, not initialized


@pytest.mark.slow
def test_trainer_starts_olmoe_from_hf_folder_with_experts_sharded(tmp_path):
    """checkpoint.initial_load_path = an OLMoE HF folder (one tensor per expert) on 2 ranks, experts sharded by
    expert parallel and FSDP: the same first step as from the converted DCP folder."""
    from torchtitan.checkpoint.formats.hf import write_hf_folder
    from torchtitan.models import get_train_spec

    spec = get_train_spec("olmoe")
    args = spec.model_args("debugmodel")
    model = spec.build_model(args)
    model.init_weights(buffer_device="cpu", seed=3)
    src, dcp_dir = tmp_path / "hf", tmp_path / "dcp"
    write_hf_folder(model.state_dict(), spec.adapter(args), str(src))
    ok(script("convert_hf_to_dcp.py", src, dcp_dir))
    common = [*TINY, "--model.name", "olmoe", "--training.steps", "1", "--training.local_batch_size", "2",
              "--parallelism.data_parallel_shard_degree", "-1", "--parallelism.expert_parallel_degree", "2",
              "--checkpoint.enable_checkpoint", "--checkpoint.interval", "100", "--metrics.enable_jsonl=false"]
    out = run_layouts(str(tmp_path), 2, common, {"hf": ["--checkpoint.initial_load_path", str(src)],
                                                 "dcp": ["--checkpoint.initial_load_path", str(dcp_dir)],
                                                 "fresh": []}, "initial_load")
    assert out["hf"]["loss"] == out["dcp"]["loss"]
    assert out["hf"]["loss"] != out["fresh"]["loss"]  # the weights were loaded, not initialized


# ------------------------------------------------------------------------ bad input
def test_conversion_errors_are_clear_and_write_nothing(tmp_path, hf_sharded):
    src, _ = hf_sharded
    # HF folder missing one tensor.
    broken = tmp_path / "hf_missing"
    broken.mkdir()
    sd = hf_tensors(src)
    del sd["model.layers.3.mlp.down_proj.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((src / "config.json").read_text())
    fails(script("convert_hf_to_dcp.py", broken, tmp_path / "o1", subprocess=True),
          r"HF checkpoint .*hf_missing does not fit this model: 1 model tensor\(s\) missing "
          r".*layers\.3\.feed_forward\.w2\.weight")
    assert not (tmp_path / "o1").exists()

    # Sharded HF folder with a shard file gone.
    partial = tmp_path / "hf_partial"
    partial.mkdir()
    for f in os.listdir(src):
        os.link(src / f, partial / f)
    victim = sorted(partial.glob("model-0000*.safetensors"))[-1]
    victim.unlink()
    fails(script("convert_hf_to_dcp.py", partial, tmp_path / "o2"), rf"index.json lists {victim.name} but the file")
    assert not (tmp_path / "o2").exists()

    # Meta checkpoint missing a tensor in every shard.
    torch.manual_seed(0)
    sd = {k: v for k, v in our_model(META_ARGS).state_dict().items() if k != "layers.1.attention.wk.weight"}
    _write_meta(tmp_path / "meta", sd, n_shards=2)
    fails(script("convert_llama_to_dcp.py", tmp_path / "meta", tmp_path / "o3"),
          r"Meta checkpoint .*meta does not fit this model: .*missing .*layers\.1\.attention\.wk\.weight")
    assert not (tmp_path / "o3").exists()

    # An existing output is never overwritten.
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(script("convert_hf_to_dcp.py", src, out), "already exists and is not empty; refusing to overwrite")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    # An interrupted DCP save (data, no .metadata) is named as such.
    half = tmp_path / "half"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"x")
    fails(script("convert_dcp_to_hf.py", half, tmp_path / "o4", "--flavor", "debugmodel"),
          r"half has .distcp data but no .metadata: the save was interrupted")
    assert not (tmp_path / "o4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family,nproc", [("llama3", 2), ("olmo", 1), ("olmoe", 1), ("gpt_oss", 2),
                                          ("deepseek_v3", 1)])
def test_last_save_in_hf_loads_in_transformers_with_our_logits(tmp_path, family, nproc):
    """checkpoint.last_save_in_hf: the final save also lands as an HF folder (FSDP-sharded weights for Llama,
    a tied embedding for OLMo, one tensor per expert for OLMoE, FSDP-sharded experts fused into gpt-oss's
    gate/up tensors, DeepSeek-V3's latent attention and expert bias) that transformers loads with the logits of
    our model on the same weights."""
    import transformers

    from tests.launch import run_train
    from torchtitan.models import get_train_spec

    dump = str(tmp_path / "run")
    run_train(dump, [*TINY, "--model.name", family, "--training.steps", "2", "--training.local_batch_size",
                     str(4 // nproc), "--checkpoint.enable", "--checkpoint.last_save_in_hf"], nproc=nproc)
    step, hf_dir = os.path.join(dump, "checkpoint", "step-2"), os.path.join(dump, "checkpoint", "step-2-hf")
    spec = get_train_spec(family)
    assert json.loads(open(os.path.join(hf_dir, "config.json")).read())["model_type"] == (
        spec.state_dict_adapter.hf_model_type)
    args = spec.model_args("debugmodel")
    args.max_seq_len = 64
    ours = spec.build_model(args)
    ours.init_weights(buffer_device="cpu")
    load_model_from_dcp(step, ours.state_dict())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    with torch.no_grad():
        diff = (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
