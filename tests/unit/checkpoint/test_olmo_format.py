"""Importing OLMo's own checkpoints (fused weights, pickled safetensors keys) equals importing the HF export."""
from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from torchtitan.checkpoint.formats.olmo import load_olmo_checkpoint
from torchtitan.models.common.decoder import Decoder as Olmo
from torchtitan.models.common.decoder import Decoder as Olmo2
from torchtitan.models.olmo import OlmoStateDictAdapter
from torchtitan.models.olmo2 import Olmo2StateDictAdapter
from torchtitan.tools.errors import CheckpointError

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

D, HEADS, LAYERS, FFN, VOCAB, THETA = 64, 4, 2, 96, 128, 123456.0


def hf_reference(family: str, tied: bool, kv_heads: int):
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  rope_theta=THETA, tie_word_embeddings=tied, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    if family == "olmo":
        model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**common, clip_qkv=1.5))
    else:
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common, rms_norm_eps=1e-6))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.normal_(1.0, 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


def olmo_config_yaml(family: str, tied: bool, kv_heads: int) -> dict:
    """A config.yaml model section as OLMo's trainer writes it (OLMo-1B / OLMo2-7B-stage1 style)."""
    model = dict(d_model=D, n_heads=HEADS, n_kv_heads=kv_heads, n_layers=LAYERS, mlp_hidden_size=2 * FFN,
                 weight_tying=tied, alibi=False, rope=True, rope_theta=THETA, include_bias=False,
                 block_type="sequential", activation_type="swiglu", max_sequence_length=64,
                 vocab_size=VOCAB - 8, embedding_size=VOCAB, attention_dropout=0.0, residual_dropout=0.0,
                 embedding_dropout=0.0, scale_logits=False, embedding_layer_norm=False)
    if family == "olmo":
        model.update(layer_norm_type="default", layer_norm_with_affine=False, attention_layer_norm=False,
                     clip_qkv=1.5)
    else:
        model.update(layer_norm_type="rms", layer_norm_with_affine=True, layer_norm_eps=1e-6,
                     attention_layer_norm=True, attention_layer_norm_with_affine=True, norm_after=True)
    return {"run_name": "test", "seed": 6198, "model": model}


def olmo_weights(family: str, hf_sd: dict, tied: bool) -> dict:
    """HF weights re-fused into OLMo's names: att_proj = q|k|v, ff_proj = up|gate."""
    out = {"transformer.wte.weight": hf_sd["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        h, b = f"model.layers.{i}.", f"transformer.blocks.{i}."
        out[b + "att_proj.weight"] = torch.cat([hf_sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[b + "attn_out.weight"] = hf_sd[h + "self_attn.o_proj.weight"]
        out[b + "ff_proj.weight"] = torch.cat([hf_sd[h + "mlp.up_proj.weight"], hf_sd[h + "mlp.gate_proj.weight"]])
        out[b + "ff_out.weight"] = hf_sd[h + "mlp.down_proj.weight"]
        if family == "olmo2":
            out[b + "q_norm.weight"] = hf_sd[h + "self_attn.q_norm.weight"]
            out[b + "k_norm.weight"] = hf_sd[h + "self_attn.k_norm.weight"]
            out[b + "attn_norm.weight"] = hf_sd[h + "post_attention_layernorm.weight"]
            out[b + "ff_norm.weight"] = hf_sd[h + "post_feedforward_layernorm.weight"]
    if family == "olmo2":
        out["transformer.ln_f.weight"] = hf_sd["model.norm.weight"]
    if not tied:
        out["transformer.ff_out.weight"] = hf_sd["lm_head.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def encode_key(key: str) -> str:
    """olmo/safetensors_util.py: base64 of pickle((key tuple, value_is_pickled))."""
    return base64.urlsafe_b64encode(pickle.dumps(((key,), False))).decode("ascii")


def write_olmo_checkpoint(folder, family: str, tied: bool, kv_heads: int, fmt: str = "safetensors"):
    hf = hf_reference(family, tied, kv_heads)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(olmo_config_yaml(family, tied, kv_heads)))
    weights = olmo_weights(family, hf.state_dict(), tied)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({encode_key(k): v for k, v in weights.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(weights, folder / "model.pt")
    return hf


CASES = [("olmo", True, HEADS), ("olmo", False, HEADS), ("olmo2", False, 2), ("olmo2", True, HEADS)]


@pytest.mark.parametrize("family,tied,kv_heads", CASES)
def test_native_import_equals_hf_import(tmp_path, family, tied, kv_heads):
    hf = write_olmo_checkpoint(tmp_path / "ckpt", family, tied, kv_heads)
    ckpt = load_olmo_checkpoint(str(tmp_path / "ckpt"), trust_pickled_keys=True)
    assert ckpt.family == family
    assert ckpt.args.rope_theta == THETA and ckpt.args.vocab_size == VOCAB and ckpt.args.tie_word_embeddings == tied
    assert ckpt.args.ffn_hidden_dim == FFN and ckpt.args.kv_heads == kv_heads
    adapter_cls = OlmoStateDictAdapter if family == "olmo" else Olmo2StateDictAdapter
    via_hf = adapter_cls(ckpt.args).from_hf(hf.state_dict())
    assert sorted(via_hf) == sorted(ckpt.state_dict)
    for k, v in via_hf.items():
        assert torch.equal(ckpt.state_dict[k], v), k
    model = (Olmo if family == "olmo" else Olmo2)(ckpt.args)
    model.load_state_dict(ckpt.state_dict)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_pickled_keys_need_explicit_trust(tmp_path):
    write_olmo_checkpoint(tmp_path, "olmo2", False, 2)
    with pytest.raises(CheckpointError, match="pickle.*--trust-pickled-keys"):
        load_olmo_checkpoint(str(tmp_path))


def test_keys_that_reference_code_are_refused_even_when_trusted(tmp_path):
    from safetensors.torch import save_file

    write_olmo_checkpoint(tmp_path, "olmo2", False, 2)
    evil = base64.urlsafe_b64encode(pickle.dumps(((os.getcwd,), False))).decode()  # a key that pulls in a global
    save_file({evil: torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd"):
        load_olmo_checkpoint(str(tmp_path), trust_pickled_keys=True)


def test_model_pt_import_needs_no_trust_flag(tmp_path):
    hf = write_olmo_checkpoint(tmp_path, "olmo", True, HEADS, fmt="pt")
    ckpt = load_olmo_checkpoint(str(tmp_path))
    expected = OlmoStateDictAdapter(ckpt.args).from_hf(hf.state_dict())
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in expected.items())


def test_unsupported_architecture_is_named(tmp_path):
    write_olmo_checkpoint(tmp_path, "olmo", False, HEADS)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["model"]["layer_norm_type"] = "rms"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="layer_norm_type='rms'"):
        load_olmo_checkpoint(str(tmp_path), trust_pickled_keys=True)


@pytest.mark.parametrize("option,value", [("scale_logits", True), ("embedding_layer_norm", True),
                                          ("rope_full_precision", False), ("residual_dropout", 0.1)])
def test_options_the_model_does_not_implement_are_refused_by_name(tmp_path, option, value):
    """OLMo configs with these set convert to a model that computes something else; the converter says which."""
    write_olmo_checkpoint(tmp_path, "olmo", False, HEADS)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["model"][option] = value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=f"does not implement: {option}={value!r}"):
        load_olmo_checkpoint(str(tmp_path), trust_pickled_keys=True)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_olmo_to_dcp.py"), str(tmp_path),
                           str(tmp_path / "out"), "--trust-pickled-keys"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not os.path.exists(tmp_path / "out")
    assert proc.stderr.count("\n") == 1 and f"{option}={value!r}" in proc.stderr, proc.stderr


def test_convert_script_writes_dcp_and_hf(tmp_path):
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import convert_olmo_to_dcp

    hf = write_olmo_checkpoint(tmp_path / "ckpt", "olmo2", False, 2)
    assert convert_olmo_to_dcp.main([str(tmp_path / "ckpt"), str(tmp_path / "dcp"), "--trust-pickled-keys",
                                     "--hf-out", str(tmp_path / "hf")]) == 0
    ckpt = load_olmo_checkpoint(str(tmp_path / "ckpt"), trust_pickled_keys=True)
    model = Olmo2(ckpt.args)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(state["model"][k], v), k
    # Written like every step folder: staged, then marked complete with the family, flavor and args.
    marker = json.loads((tmp_path / "dcp" / ".complete").read_text())
    assert marker["kind"] == "converted" and marker["model"] == "olmo2" and marker["model_args"]["dim"] == ckpt.args.dim
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    tokens = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert (exported(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-5


def test_plain_safetensors_names_need_no_trust_flag(tmp_path):
    from safetensors.torch import save_file

    hf = write_olmo_checkpoint(tmp_path, "olmo2", False, 2, fmt="pt")
    save_file(torch.load(tmp_path / "model.pt"), str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / "model.pt")
    ckpt = load_olmo_checkpoint(str(tmp_path))
    expected = Olmo2StateDictAdapter(ckpt.args).from_hf(hf.state_dict())
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in expected.items())
