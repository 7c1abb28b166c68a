"""OLMoE: logits equal transformers' OlmoeForCausalLM after an HF import (with and without norm_topk_prob);
HF -> DCP -> HF is bitwise under transformers' per-expert names and transformers loads the export with our
logits; the released config.json is the 1B-7B flavor; what OLMoE's HF format cannot express is refused, on
export and on import, with one line naming it."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.integration.checkpoint_helpers import script
from tests.reference import hf_tensors, import_hf, save_random_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.checkpoint.formats.hf import (
    hf_native_shapes,
    model_from_hf_config,
    read_hf_config,
    write_hf_folder,
)
from torchtitan.checkpoint.io import MARKER, expected_shapes
from torchtitan.models import get_train_spec
from torchtitan.models.common.moe import MoEArgs
from torchtitan.models.common.rope import YarnScaling
from torchtitan.models.olmoe import OlmoeStateDictAdapter, olmoe_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB = 2048
EXPERTS = 8
# allenai/OLMoE-1B-7B-0924's config.json as released (written by transformers 4.43).
RELEASED_CONFIG = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}


def make_hf(folder, seed: int = 0, **config):
    """A random tiny OlmoeForCausalLM in fp32 (2 layers, dim 64, 4 heads, 8 experts of width 32, top-2; norm
    weights random too), saved to folder; returned in eval mode."""
    cfg = transformers.OlmoeConfig(**{
        "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_experts": EXPERTS, "num_experts_per_tok": 2, "vocab_size": VOCAB, "max_position_embeddings": 128,
        "pad_token_id": None, "eos_token_id": None, "bos_token_id": None,
        # Larger than HF's 0.02 so logits and router choices are well separated.
        "initializer_range": 0.1, **config})
    return save_random_hf(transformers.OlmoeForCausalLM, cfg, folder, seed)


def random_ours(args):
    spec = get_train_spec("olmoe")
    torch.manual_seed(0)
    model = spec.build_model(args)
    model.init_weights(buffer_device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "router" in name:
                p.normal_(0.0, 0.5)  # routing decided by margins far above float rounding
    return spec, model.eval()


@pytest.mark.parametrize("config", [dict(), dict(norm_topk_prob=True, num_key_value_heads=2)],
                         ids=["plain", "norm-topk-gqa"])
def test_logits_equal_transformers_after_hf_import(tmp_path, config):
    hf = make_hf(tmp_path, **config)
    info, ours = import_hf(tmp_path)
    assert info.name == "olmoe"
    assert info.args.moe == MoEArgs(num_experts=EXPERTS, top_k=2, hidden_dim=32,
                                    norm_topk_prob=config.get("norm_topk_prob", False))
    assert info.args.kv_heads == config.get("num_key_value_heads", 4)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (ours(tokens) - ref).abs().max().item() <= 1e-5
        # The experts are in play: the same weights routed top-1 give other logits.
        other = info.spec.build_model(dataclasses.replace(info.args, moe=dataclasses.replace(info.args.moe, top_k=1)))
        other.load_state_dict(ours.state_dict())
        assert (other.eval()(tokens) - ref).abs().max().item() > 1e-2


def test_hf_to_dcp_to_hf_is_bitwise_and_loads_in_transformers(tmp_path):
    src, dcp_dir, back = tmp_path / "hf", tmp_path / "dcp", tmp_path / "back"
    hf = make_hf(src, num_hidden_layers=3, tie_word_embeddings=False)
    p = script("convert_hf_to_dcp.py", src, dcp_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    marker = json.loads((dcp_dir / MARKER).read_text())
    assert marker["model"] == "olmoe" and marker["model_args"]["moe"]["num_experts"] == EXPERTS
    p = script("convert_dcp_to_hf.py", dcp_dir, back, "--num-shards", "2")  # family and args from the marker
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = hf_tensors(src), hf_tensors(back)
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in b and "model.layers.0.mlp.gate.weight" in b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv", "rope_parameters",
                "router_aux_loss_coef", "output_router_logits"):
        assert cfg_a[key] == cfg_b[key], key
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager")
        assert torch.equal(reloaded.eval()(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_our_export_loads_in_transformers_with_our_logits(tmp_path, tied):
    # ffn_hidden_dim = the expert width: HF's intermediate_size says both.
    moe = MoEArgs(num_experts=EXPERTS, top_k=2, hidden_dim=96, norm_topk_prob=True)
    args = dataclasses.replace(olmoe_flavors["debugmodel"], n_layers=2, max_seq_len=128, rope_theta=54321.0,
                               ffn_hidden_dim=96, tie_word_embeddings=tied, moe=moe)
    spec, ours = random_ours(args)
    write_hf_folder(ours.state_dict(), spec.adapter(args), str(tmp_path / "hf"))
    assert ("lm_head.weight" in hf_tensors(tmp_path / "hf")) != tied
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "OlmoeForCausalLM" and hf.config.num_experts == EXPERTS
    tokens = torch.randint(0, args.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    # The config comes back to the same args, also as transformers re-saves it.
    assert OlmoeStateDictAdapter.args_from_hf_config(read_hf_config(str(tmp_path / "hf"))) == args
    hf.config.save_pretrained(str(tmp_path / "resaved"))
    assert OlmoeStateDictAdapter.args_from_hf_config(read_hf_config(str(tmp_path / "resaved"))) == args


def test_released_config_is_the_1b_7b_flavor():
    args = OlmoeStateDictAdapter.args_from_hf_config(RELEASED_CONFIG)
    assert args == olmoe_flavors["1B-7B"] and get_train_spec("olmoe").matching_flavor(args) == "1B-7B"
    ours = OlmoeStateDictAdapter(args).hf_config("bfloat16")
    assert {k: ours[k] for k in RELEASED_CONFIG if k != "transformers_version"} == {
        k: v for k, v in RELEASED_CONFIG.items() if k != "transformers_version"}
    model = get_train_spec("olmoe").build_meta_model(args)
    assert model.num_params() / 1e9 == pytest.approx(6.92, rel=0.01)
    assert model.num_params(active=True) / 1e9 == pytest.approx(1.28, rel=0.01)


@pytest.mark.parametrize("flavor", [name for name, args in olmoe_flavors.items() if args.moe is not None])
def test_flavors_round_trip_through_config_json(flavor):
    """Every MoE flavor (debugmodel-dense, the benchmark's dense comparator, has no HF form: OLMoE is all MoE)."""
    args = olmoe_flavors[flavor]
    cfg = json.loads(json.dumps(OlmoeStateDictAdapter(args).hf_config("bfloat16")))
    assert (cfg["intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]) == (
        args.moe.hidden_dim, args.moe.num_experts, args.moe.top_k)
    back = OlmoeStateDictAdapter.args_from_hf_config(cfg)
    assert back == args and get_train_spec("olmoe").matching_flavor(back) == flavor


def test_hf_names_and_shapes_without_memory():
    """Every native tensor has its HF tensors; the expert stacks come apart into transformers' per-expert names
    and back, also on the meta device (what the shape checks and the block-by-block export use)."""
    args = olmoe_flavors["debugmodel"]
    adapter = OlmoeStateDictAdapter(args)
    with torch.device("meta"):
        native = get_train_spec("olmoe").build_model(args).state_dict()
    hf = adapter.to_hf(native)
    assert len(hf) == len(native) - 3 * args.n_layers + 3 * EXPERTS * args.n_layers
    assert hf["model.layers.3.mlp.experts.7.gate_proj.weight"].shape == (256, 128)
    assert hf["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (128, 256)
    assert hf["model.layers.0.mlp.gate.weight"].shape == (EXPERTS, 128)
    assert adapter.native_key("model.layers.3.mlp.experts.5.up_proj.weight") == "layers.3.feed_forward.experts.w3"
    back = adapter.from_hf(hf)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in native.items()}
    with pytest.raises(CheckpointError, match="one HF tensor per expert"):
        adapter.hf_key("layers.0.feed_forward.experts.w1")


EXPORT_REFUSALS = {
    "shared-expert": (dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256, shared_expert_hidden_dim=256)),
                      r"moe\.shared_expert_hidden_dim = 256 \(no shared expert\)"),
    "sigmoid": (dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256, score_func="sigmoid")),
                r"moe\.score_func = 'sigmoid' \(softmax only\)"),
    "expert-bias": (dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256, expert_bias=True)),
                    r"moe\.expert_bias = True"),
    "dense-layers": (dict(moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256, n_dense_layers=1)),
                     r"moe\.n_dense_layers = 1 \(every layer MoE\)"),
    "clip-qkv": (dict(clip_qkv=8.0), r"clip_qkv = 8\.0 \(transformers clips after the QK-norm"),
    "yarn": (dict(rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64)),
             r"rope_scaling is set"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_what_olmoe_hf_cannot_express(tmp_path, case):
    changes, message = EXPORT_REFUSALS[case]
    args = dataclasses.replace(olmoe_flavors["debugmodel"], **changes)
    adapter = OlmoeStateDictAdapter(args)
    with torch.device("meta"):
        native = get_train_spec("olmoe").build_model(args).state_dict()
    for call in (adapter.hf_config, lambda: adapter.to_hf(native), lambda: adapter.from_hf({})):
        with pytest.raises(CheckpointError, match=message) as e:
            call()
        assert "\n" not in str(e.value) and "cannot express this" in str(e.value)
    # The whole export stops before anything is written.
    with pytest.raises(CheckpointError, match=message):
        write_hf_folder(native, adapter, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


IMPORT_REFUSALS = {
    "clip-qkv": (dict(clip_qkv=8.0), r"clip_qkv 8\.0 is not supported for OLMoE"),
    "rope-linear": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_type.*'linear'.*not supported"),
    "top-k-above-experts": (dict(num_experts_per_tok=65), r"moe\.top_k = 65 must be in 1\.\.num_experts \(64\)"),
    "no-intermediate-size": (dict(intermediate_size=None), r"lacks a field or has a bad value"),
    "no-expert-count": (dict(num_experts="many"), r"bad or missing expert or norm field"),
    "attention-bias": (dict(attention_bias=True), r"attention/MLP biases are not supported"),
}


@pytest.mark.parametrize("case", list(IMPORT_REFUSALS))
def test_import_refuses_what_the_model_cannot_compute(case):
    changes, message = IMPORT_REFUSALS[case]
    with pytest.raises(CheckpointError, match=message):
        OlmoeStateDictAdapter.args_from_hf_config({**RELEASED_CONFIG, **changes}, "ckpt/config.json")


def test_missing_or_extra_experts_are_named(tmp_path):
    src = tmp_path / "hf"
    make_hf(src)
    info = model_from_hf_config(read_hf_config(str(src)), str(src))
    adapter = info.spec.adapter(info.args)
    assert hf_native_shapes(str(src), adapter) == expected_shapes(info.spec, info.args)
    sd = hf_tensors(src)
    for name, change in (("missing", "model.layers.1.mlp.experts.3.down_proj.weight"),
                         ("extra", "model.layers.1.mlp.experts.8.down_proj.weight")):
        broken = tmp_path / name
        broken.mkdir()
        bad = dict(sd)
        if name == "missing":
            del bad[change]
        else:
            bad[change] = sd["model.layers.1.mlp.experts.0.down_proj.weight"].clone()
        save_file(bad, broken / "model.safetensors", metadata={"format": "pt"})
        (broken / "config.json").write_text((src / "config.json").read_text())
        p = script("convert_hf_to_dcp.py", broken, tmp_path / f"out-{name}")
        want = "missing 3, unexpected none" if name == "missing" else "missing none, unexpected 8"
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert f"'layers.1.feed_forward.experts.w2' but the model has 8 experts (0..7): {want}" in p.stderr
        assert not (tmp_path / f"out-{name}").exists()


def test_an_hf_export_transformers_cannot_express_fails_at_start_up():
    """debugmodel-dense has no OLMoE HF form: asking for the final HF export is a one-line error before training."""
    from torchtitan.config import load_config
    from torchtitan.tools.errors import ConfigError
    from torchtitan.trainer.plan import make_plan

    config = os.path.join(os.path.dirname(__file__), "..", "..", "..", "train_configs", "olmoe_debug.toml")
    argv = ["--job.config_file", config, "--checkpoint.enable", "--checkpoint.last_save_in_hf"]
    make_plan(load_config(argv, env={}), 1)
    with pytest.raises(ConfigError, match="last_save_in_hf.*cannot express"):
        make_plan(load_config([*argv, "--model.flavor", "debugmodel-dense"], env={}), 1)
