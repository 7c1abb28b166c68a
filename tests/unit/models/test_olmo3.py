"""OLMo 3: logits equal transformers' Olmo3ForCausalLM when the sliding window is shorter than the prompt, with
plain RoPE and with YaRN on the full-attention layers (the released 65K-context models); HF -> DCP -> HF is
bitwise and keeps the RoPE config; our export loads in transformers; layer_types <-> attention_pattern, and what
an import refuses; model args survive a marker; scripts/generate.py greedy-decodes an OLMo 3 HF folder as
transformers does. (YaRN's frequencies: tests/unit/models/common/test_rope.py; both RoPE tables on every pipeline
stage: tests/unit/distributed/test_pipeline.py.)"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from tests.integration.checkpoint_helpers import script
from tests.reference import hf_tensors, import_hf, save_random_hf
from torchtitan.checkpoint import CheckpointError
from torchtitan.checkpoint.formats.hf import read_hf_config, write_hf_folder
from torchtitan.checkpoint.io import MARKER, model_args_from_dict, model_args_to_dict
from torchtitan.models import get_train_spec
from torchtitan.models.common.rope import RopeScaling, YarnScaling
from torchtitan.models.llama3 import LlamaModelArgs, llama3_flavors
from torchtitan.models.olmo3 import Olmo3ModelArgs, Olmo3StateDictAdapter, olmo3_flavors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

WINDOW = 8  # shorter than every sequence below, so sliding layers drop keys
S, F = "sliding_attention", "full_attention"


def make_hf(folder, layer_types: list[str] | None, n_layers: int = 6, kv_heads: int = 2, seed: int = 0, **config):
    """A random tiny Olmo3ForCausalLM (norm weights random too), saved to folder; returned in eval mode."""
    cfg = transformers.Olmo3Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=2048, max_position_embeddings=128, sliding_window=WINDOW,
        layer_types=layer_types, rms_norm_eps=1e-6, pad_token_id=None, eos_token_id=None, bos_token_id=None,
        # Larger than HF's 0.02 so logits are well separated and greedy choices are robust.
        initializer_range=0.1, **config)
    return save_random_hf(transformers.Olmo3ForCausalLM, cfg, folder, seed)


# (layer_types, extra Olmo3Config kwargs, the attention_pattern we expect): transformers' default pattern with
# GQA; an irregular pattern, MHA and a non-default theta given per layer type (the transformers 5.x form).
LOGIT_CASES = {
    "default-pattern-gqa": (None, dict(), ("sliding", "sliding", "sliding", "full")),
    "irregular-mha-theta": ([F, S, S, F, S], dict(num_key_value_heads=4, rope_parameters={
        t: {"rope_type": "default", "rope_theta": 12345.0} for t in (S, F)}), ("full", "sliding", "sliding")),
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_logits_equal_transformers_after_hf_import(tmp_path, case):
    layer_types, config, pattern = LOGIT_CASES[case]
    n_layers = len(layer_types) if layer_types else 6
    config = {"kv_heads": config.pop("num_key_value_heads", 2), **config}
    hf = make_hf(tmp_path, layer_types, n_layers=n_layers, **config)
    info, ours = import_hf(tmp_path)
    assert info.name == "olmo3" and info.args.attention_pattern == pattern and info.args.sliding_window == WINDOW
    assert info.args.rope_theta == (12345.0 if "rope_parameters" in config else 500000.0)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (ours(tokens) - ref).abs().max().item() < 1e-5
        # The window is exercised: the same weights with every layer full give other logits.
        full = info.spec.build_model(dataclasses.replace(info.args, attention_pattern=("full",)))
        full.load_state_dict(ours.state_dict())
        assert (full.eval()(tokens) - ref).abs().max().item() > 1e-2


# A tiny YaRN: 16 original positions, so a 48-token prompt runs three times past them.
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
             "beta_slow": 1}
# (Olmo3Config kwargs, the rope_scaling_layers we expect): the released models' form (transformers 4.x wrote a
# top-level rope_scaling, applied to the full-attention layers); the 5.x form keyed by layer type, with an
# explicit attention factor and a theta whose YaRN ramp has a partial step; YaRN on every layer.
YARN_CASES = {
    "legacy-rope-scaling": (dict(rope_scaling=TINY_YARN), "full"),
    "keyed-attention-factor": (dict(rope_parameters={S: {"rope_type": "default", "rope_theta": 1000.0},
                                                     F: {**TINY_YARN, "attention_factor": 1.25, "rope_theta": 1000.0}}),
                               "full"),
    "keyed-every-layer": (dict(rope_parameters={t: {**TINY_YARN, "rope_theta": 1000.0} for t in (S, F)}), "all"),
}


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_logits_equal_transformers_with_yarn(tmp_path, case):
    config, layers = copy.deepcopy(YARN_CASES[case])  # Olmo3Config fills in the dicts it is given
    hf = make_hf(tmp_path, None, **config)
    info, ours = import_hf(tmp_path)
    a = info.args
    assert isinstance(a.rope_scaling, YarnScaling) and a.rope_scaling_layers == layers
    assert (a.rope_scaling.factor, a.rope_scaling.original_max_position_embeddings) == (4.0, 16)
    # Two RoPE tables exactly when some layers skip the scaling; neither is in the state dict.
    assert hasattr(ours, "plain_rope_cache") == (layers == "full")
    assert not any("rope" in k for k in ours.state_dict())
    tokens = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (ours(tokens) - ref).abs().max().item() < 1e-5
        # The scaling matters, and so does which layers it applies to.
        other = dataclasses.replace(a, rope_scaling_layers="all" if layers == "full" else "full")
        for changed in (dataclasses.replace(a, rope_scaling=None), other):
            model = info.spec.build_model(changed)
            model.load_state_dict(ours.state_dict())
            assert (model.eval()(tokens) - ref).abs().max().item() > 1e-3


def test_hf_to_dcp_to_hf_is_bitwise(tmp_path):
    src, dcp_dir, back = tmp_path / "hf", tmp_path / "dcp", tmp_path / "back"
    make_hf(src, None, rope_scaling={**TINY_YARN, "attention_factor": 1.2})
    p = script("convert_hf_to_dcp.py", src, dcp_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    marker = json.loads((dcp_dir / MARKER).read_text())
    assert marker["model"] == "olmo3" and marker["model_args"]["attention_pattern"] == ["sliding"] * 3 + ["full"]
    assert marker["model_args"]["rope_scaling"]["kind"] == "yarn"
    assert marker["model_args"]["rope_scaling_layers"] == "full"
    p = script("convert_dcp_to_hf.py", dcp_dir, back)  # family and args from the marker
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "layer_types", "sliding_window", "rope_parameters"):
        assert cfg_a[key] == cfg_b[key], key


def test_our_export_loads_in_transformers_with_our_logits(tmp_path):
    args = dataclasses.replace(olmo3_flavors["debugmodel"], max_seq_len=128, rope_theta=54321.0)
    spec = get_train_spec("olmo3")
    torch.manual_seed(0)
    ours = spec.build_model(args)
    ours.init_weights(buffer_device="cpu")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    write_hf_folder(ours.state_dict(), spec.adapter(args), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()  # sdpa attention
    assert type(hf).__name__ == "Olmo3ForCausalLM" and hf.config.sliding_window == 64
    assert hf.config.layer_types == [S, S, S, F]
    tokens = torch.randint(0, args.vocab_size, (2, 96))  # past the window (64) and YaRN's original 64 positions
    with torch.no_grad():
        assert (ours.eval()(tokens) - hf(tokens).logits).abs().max().item() < 1e-5
    # The config comes back to the same args, also as transformers re-saves it (5.x: rope keyed by layer type).
    assert Olmo3StateDictAdapter.args_from_hf_config(read_hf_config(str(tmp_path / "hf"))) == args
    hf.config.save_pretrained(str(tmp_path / "resaved"))
    assert Olmo3StateDictAdapter.args_from_hf_config(read_hf_config(str(tmp_path / "resaved"))) == args


@pytest.mark.parametrize("flavor", list(olmo3_flavors))
def test_flavors_round_trip_through_config_json(flavor):
    args = olmo3_flavors[flavor]
    cfg = json.loads(json.dumps(Olmo3StateDictAdapter(args).hf_config("bfloat16")))
    assert cfg["layer_types"] == [F if (i + 1) % 4 == 0 else S for i in range(args.n_layers)]
    back = Olmo3StateDictAdapter.args_from_hf_config(cfg)
    assert back == args and get_train_spec("olmo3").matching_flavor(back) == flavor


@pytest.mark.parametrize("n_layers,pattern,window,layer_types", [
    (6, ("sliding", "sliding", "sliding", "full"), 16, [S, S, S, F, S, S]),
    (4, ("full", "sliding", "sliding"), 16, [F, S, S, F]),
    (3, ("sliding",), 16, [S, S, S]),
    (3, ("full",), None, [F, F, F]),
])
def test_attention_pattern_round_trips_through_layer_types(n_layers, pattern, window, layer_types):
    args = dataclasses.replace(olmo3_flavors["debugmodel"], n_layers=n_layers, attention_pattern=pattern,
                               sliding_window=window)
    cfg = Olmo3StateDictAdapter(args).hf_config()
    assert cfg["layer_types"] == layer_types
    assert cfg["sliding_window"] == (window or args.max_seq_len)  # transformers needs a window even when unused
    assert Olmo3StateDictAdapter.args_from_hf_config(json.loads(json.dumps(cfg))) == args


YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2079,
        "beta_fast": 32, "beta_slow": 1}
BAD_CONFIGS = {
    "unknown-layer-type": (dict(layer_types=[S, "chunked_attention", S, F]), r"layer_types has 'chunked_attention'"),
    "layer-types-length": (dict(layer_types=[S, F]), r"layer_types must be a list of one entry per layer \(4\)"),
    "no-window": (dict(sliding_window=None), r"sliding_window None must be an integer >= 1"),
    "legacy-longrope": (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
                        r"rope type 'longrope' on the full_attention layers \(rope_scaling / rope_parameters\."
                        r"full_attention\) is not supported"),
    "keyed-linear": (dict(rope_parameters={S: {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                                           F: {"rope_type": "default", "rope_theta": 5e5}}),
                     r"rope type 'linear' on the sliding_attention layers"),
    "yarn-on-sliding-only": (dict(rope_parameters={S: {**YARN, "rope_theta": 5e5},
                                                   F: {"rope_type": "default", "rope_theta": 5e5}}),
                             r"scale the sliding_attention layers \('yarn'\) unlike the full_attention ones"),
    "two-yarns": (dict(rope_parameters={S: {**YARN, "factor": 4.0, "rope_theta": 5e5}, F: {**YARN, "rope_theta": 5e5}}),
                  r"scale the sliding_attention layers"),
    "yarn-untruncated": (dict(rope_scaling={**YARN, "truncate": False}), r"full_attention sets truncate: false"),
    "yarn-partial-rotary": (dict(rope_scaling={**YARN, "partial_rotary_factor": 0.5}), r"partial_rotary_factor 0\.5"),
    "two-thetas": (dict(rope_parameters={S: {"rope_type": "default", "rope_theta": 1e4},
                                         F: {"rope_type": "default", "rope_theta": 5e5}}), r"different rope_theta"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_import_refuses_what_the_decoder_cannot_compute(case):
    changes, message = BAD_CONFIGS[case]
    cfg = {**Olmo3StateDictAdapter(dataclasses.replace(olmo3_flavors["debugmodel"], rope_scaling=None)).hf_config(),
           **changes}
    if "rope_parameters" not in changes:
        del cfg["rope_parameters"]  # the transformers 4.x form: rope_theta (+ rope_scaling)
    with pytest.raises(CheckpointError, match=message):
        Olmo3StateDictAdapter.args_from_hf_config(cfg, "ckpt/config.json")


@pytest.mark.parametrize("form", ["legacy", "keyed", "flat"])
def test_released_rope_config_imports_as_the_flavor(form):
    """The 7B's config.json as released (4.x: top-level rope_scaling), as transformers 5.x re-saves it (keyed),
    and as a flat rope_parameters: YaRN on the full-attention layers, equal to the 7B flavor."""
    cfg = Olmo3StateDictAdapter(olmo3_flavors["7B"]).hf_config("bfloat16")
    yarn = {**YARN, "attention_factor": 1.2079441541679836}
    del cfg["rope_parameters"], cfg["rope_scaling"]
    if form == "legacy":
        cfg["rope_scaling"] = yarn
    elif form == "keyed":
        cfg["rope_parameters"] = {S: {"rope_type": "default", "rope_theta": 500000}, F: {**yarn, "rope_theta": 500000}}
    else:
        cfg["rope_parameters"] = {**yarn, "rope_theta": 500000}
    args = Olmo3StateDictAdapter.args_from_hf_config(json.loads(json.dumps(cfg)))
    assert args == olmo3_flavors["7B"] and get_train_spec("olmo3").matching_flavor(args) == "7B"


@pytest.mark.parametrize("pattern,layers", [(("sliding",), "full"), (("sliding",), "all"), (("full",), "full"),
                                            (("full",), "all")])
def test_yarn_of_a_layer_type_no_layer_has_round_trips(pattern, layers):
    """Only one layer type in use: the file's scaling of the other comes back on export all the same."""
    args = dataclasses.replace(olmo3_flavors["debugmodel"], attention_pattern=pattern, rope_scaling_layers=layers,
                               sliding_window=64 if pattern == ("sliding",) else None)
    cfg = json.loads(json.dumps(Olmo3StateDictAdapter(args).hf_config()))
    assert (cfg["rope_parameters"][S]["rope_type"] == "yarn") == (layers == "all")
    assert Olmo3StateDictAdapter.args_from_hf_config(cfg) == args


def test_yarn_on_full_layers_is_irrelevant_when_every_layer_slides():
    cfg = {**Olmo3StateDictAdapter(olmo3_flavors["debugmodel"]).hf_config(), "rope_scaling": YARN,
           "layer_types": [S] * 4}
    del cfg["rope_parameters"]
    args = Olmo3StateDictAdapter.args_from_hf_config(cfg)
    assert isinstance(args, Olmo3ModelArgs) and args.attention_pattern == ("sliding",)
    assert all(args.layer_rope_scaling(i) is None for i in range(args.n_layers))
    # A type no layer has may carry a rope type we cannot compute: transformers never computes it either.
    cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}
    assert Olmo3StateDictAdapter.args_from_hf_config(cfg).rope_scaling is None


def test_export_refuses_what_transformers_olmo3_cannot_say():
    base = olmo3_flavors["debugmodel"]
    with pytest.raises(CheckpointError, match="rope_scaling is 'llama3'"):
        Olmo3StateDictAdapter(dataclasses.replace(base, rope_scaling=RopeScaling())).hf_config()
    untruncated = dataclasses.replace(base, rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64,
                                                                     truncate=False))
    with pytest.raises(CheckpointError, match=r"truncate = False cannot be exported"):
        Olmo3StateDictAdapter(untruncated).hf_config()


@pytest.mark.parametrize("flavor", list(olmo3_flavors))
def test_model_args_survive_the_marker_json(flavor):
    args = olmo3_flavors[flavor]
    d = json.loads(json.dumps(model_args_to_dict(args)))
    assert d["rope_scaling"]["kind"] == "yarn"
    assert model_args_from_dict(Olmo3ModelArgs, d) == args
    with pytest.raises(CheckpointError, match=r"rope_scaling: kind 'ntk' is not one of 'llama3', 'yarn'"):
        model_args_from_dict(Olmo3ModelArgs, {**d, "rope_scaling": {**d["rope_scaling"], "kind": "ntk"}})
    with pytest.raises(CheckpointError, match=r"rope_scaling: low_freq_factor are not fields of YarnScaling"):
        model_args_from_dict(Olmo3ModelArgs, {**d, "rope_scaling": {**d["rope_scaling"], "low_freq_factor": 1.0}})


def test_markers_written_before_yarn_still_read_as_llama_scaling():
    args = llama3_flavors["8B"]
    d = json.loads(json.dumps(model_args_to_dict(args)))
    assert d["rope_scaling"]["kind"] == "llama3"
    del d["rope_scaling"]["kind"], d["rope_scaling_layers"]  # what older markers hold
    back = model_args_from_dict(LlamaModelArgs, d)
    assert back == args and isinstance(back.rope_scaling, RopeScaling)


def test_generate_script_matches_transformers_on_an_hf_folder(tmp_path):
    prompt, new = [1, 17, 300, 42, 1999, 5], 12  # 18 tokens: past the window of 8
    hf = make_hf(tmp_path, None, n_layers=4)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    p = script("generate.py", "--checkpoint", tmp_path, "--prompt-ids", ",".join(map(str, prompt)),
               "--max-new-tokens", new, "--ignore-eos", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["generated_ids"] == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("flavor,params_b", [("7B", 7.30), ("32B", 32.23)])
def test_flavor_sizes(flavor, params_b):
    model = get_train_spec("olmo3").build_meta_model(olmo3_flavors[flavor])
    assert model.num_params() / 1e9 == pytest.approx(params_b, rel=0.01)
