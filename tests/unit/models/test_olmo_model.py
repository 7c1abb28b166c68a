"""OLMo 1 and OLMo 2: logits equal transformers' on the same random weights, through the HF adapter;
export with config.json loads in transformers; flavors have the published sizes."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from torchtitan.models.common.decoder import Decoder as Olmo
from torchtitan.models.common.decoder import Decoder as Olmo2
from torchtitan.models.olmo import OlmoStateDictAdapter, olmo_flavors
from torchtitan.models.olmo2 import Olmo2StateDictAdapter, olmo2_flavors

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "olmo": (olmo_flavors, Olmo, OlmoStateDictAdapter, "OlmoForCausalLM"),
    "olmo2": (olmo2_flavors, Olmo2, Olmo2StateDictAdapter, "Olmo2ForCausalLM"),
}
# (family, changes to the debug flavor): tied + clip_qkv small enough to clamp, untied MHA, GQA.
CASES = {
    "olmo-tied-clip": ("olmo", dict(tie_word_embeddings=True, clip_qkv=0.5)),
    "olmo-untied": ("olmo", dict(tie_word_embeddings=False)),
    "olmo2-gqa": ("olmo2", dict()),
    "olmo2-mha-theta": ("olmo2", dict(n_kv_heads=None, rope_theta=12345.0)),
}


def build(family: str, **changes):
    flavors, cls, adapter_cls, arch = FAMILIES[family]
    args = dataclasses.replace(flavors["debugmodel"], n_layers=2, max_seq_len=128, **changes)
    torch.manual_seed(0)
    model = cls(args)
    model.init_weights()
    with torch.no_grad():  # randomize norm weights so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return args, model, adapter_cls(args), arch


def hf_model(adapter, arch: str):
    cfg = transformers.AutoConfig.for_model(**adapter.hf_config())
    cfg._attn_implementation = "eager"
    return getattr(transformers, arch)(cfg).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    family, changes = CASES[case]
    args, ours, adapter, arch = build(family, **changes)
    hf = hf_model(adapter, arch)
    missing, unexpected = hf.load_state_dict(adapter.to_hf(ours.state_dict()), strict=False)
    tied_head = ["lm_head.weight"] if args.tie_word_embeddings else []
    assert not unexpected and all("rotary" in m for m in missing if m not in tied_head), (missing, unexpected)
    if args.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, args.vocab_size, (2, 96))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
    back = adapter.from_hf(hf.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_with_config_loads_in_transformers(family, tmp_path):
    from safetensors.torch import save_file

    args, ours, adapter, _ = build(family)
    save_file({k: v.contiguous() for k, v in adapter.to_hf(ours.state_dict()).items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(adapter.hf_config()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(hf).__name__ == FAMILIES[family][3]
    tokens = torch.randint(0, args.vocab_size, (1, 64))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    # And the config comes back to the same model args.
    parsed = type(adapter).args_from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert parsed == dataclasses.replace(args, sdpa_backend=parsed.sdpa_backend)
    # transformers' own saved config (5.x nests rope_theta) parses too.
    hf.config.save_pretrained(str(tmp_path / "resaved"))
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert type(adapter).args_from_hf_config(resaved).rope_theta == args.rope_theta


@pytest.mark.parametrize("family", list(FAMILIES))
def test_positions_argument_matches_contiguous_forward(family):
    args, ours, _, _ = build(family)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    positions = torch.arange(32).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(ours(tokens), ours(tokens, positions), atol=1e-6)


@pytest.mark.parametrize("family,flavor,params_b", [
    ("olmo", "1B", 1.18), ("olmo", "7B", 6.89), ("olmo", "1.7-7B", 6.89),
    ("olmo2", "1B", 1.48), ("olmo2", "7B", 7.30), ("olmo2", "13B", 13.72), ("olmo2", "32B", 32.23),
])
def test_flavor_sizes(family, flavor, params_b):
    args = FAMILIES[family][0][flavor]
    with torch.device("meta"):
        model = FAMILIES[family][1](args)
    assert model.num_params(exclude_embedding=False) / 1e9 == pytest.approx(params_b, rel=0.01)
    assert sum(p.numel() for p in model.parameters()) == model.num_params(exclude_embedding=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_initial_load_from_an_hf_folder(family, tmp_path):
    """checkpoint.initial_load_path = an HF folder goes through our adapter (tied weights stay tied)."""
    from safetensors.torch import save_file

    from torchtitan.checkpoint import ModelWrapper
    from torchtitan.checkpoint.formats.hf import load_hf_into_model

    args, src, adapter, _ = build(family, tie_word_embeddings=(family == "olmo"))
    save_file({k: v.contiguous() for k, v in adapter.to_hf(src.state_dict()).items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(adapter.hf_config()))
    torch.manual_seed(1)
    dst = FAMILIES[family][1](args)
    dst.init_weights()
    load_hf_into_model(ModelWrapper([dst]), adapter, str(tmp_path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert (dst.output.weight is dst.tok_embeddings.weight) == args.tie_word_embeddings
