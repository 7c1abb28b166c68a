"""The checks every family's HF adapter passes against transformers, written once (tests/unit/models/test_*.py)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.integration.checkpoint_helpers import script
from tests.reference import hf_tensors
from torchtitan.checkpoint import CheckpointError
from torchtitan.checkpoint.formats.hf import read_hf_config, write_hf_folder

VOCAB = 2048  # the tiny models' vocabulary: the bundled tokenizer's size
# A 20-token prompt: longer than the tiny models' sliding windows, so generation runs past them.
PROMPT = [1, 17, 300, 42, 1999, 5, 77, 901, 4, 33, 250, 1000, 8, 9, 61, 70, 1500, 2, 3, 11]


def assert_round_trip_bitwise(src, tmp_path, hf, config_keys: list[str], vocab: int) -> dict[str, torch.Tensor]:
    """HF folder `src` -> DCP (convert_hf_to_dcp.py) -> HF (convert_dcp_to_hf.py, 2 shards): the same tensors
    bit for bit, the same `config_keys` in config.json, and transformers loads the export with `hf`'s logits.
    Returns the exported tensors."""
    import transformers

    dcp_dir, back = tmp_path / "dcp", tmp_path / "back"
    p = script("convert_hf_to_dcp.py", src, dcp_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    p = script("convert_dcp_to_hf.py", dcp_dir, back, "--num-shards", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for cfg in (cfg_a, cfg_b):  # transformers writes num_experts as num_local_experts in some families
        if "num_local_experts" in cfg:
            cfg.setdefault("num_experts", cfg["num_local_experts"])
    for key in config_keys:
        # transformers releases differ in what they write (5.15 leaves out gpt-oss's swiglu_limit): compare its keys
        assert key not in cfg_a or cfg_a[key] == cfg_b.get(key), key
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager")
        assert torch.equal(reloaded.eval()(tokens).logits, hf(tokens).logits)
    return b


def assert_export_loads_with_our_logits(spec, args, ours, folder, seq_len: int):
    """Our model's HF export: transformers builds the family's class from it with our logits (1e-5), and its
    config.json reads back to the same args, also as transformers saves it again. Returns transformers' model."""
    import transformers

    write_hf_folder(ours.state_dict(), spec.adapter(args), str(folder / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "hf"), attn_implementation="eager").eval()
    assert type(hf).__name__ == spec.state_dict_adapter.hf_architecture
    tokens = torch.randint(0, args.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    adapter_cls = spec.state_dict_adapter
    assert adapter_cls.args_from_hf_config(read_hf_config(str(folder / "hf"))) == args
    hf.config.save_pretrained(str(folder / "resaved"))
    assert adapter_cls.args_from_hf_config(read_hf_config(str(folder / "resaved"))) == args
    return hf


def assert_greedy_generate_matches(hf, hf_dir, tmp_path, prompt: list[int], new: int = 12) -> None:
    """scripts/generate.py, greedy, on the HF folder and on its converted step folder: transformers' tokens."""
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)[0, len(prompt):].tolist()
    dcp_dir = tmp_path / "dcp-generate"
    assert script("convert_hf_to_dcp.py", hf_dir, dcp_dir).returncode == 0
    common = ["--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new), "--ignore-eos", "--json"]
    for folder in (hf_dir, dcp_dir):
        p = script("generate.py", "--checkpoint", folder, *common)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["generated_ids"] == want, folder


def assert_export_refused(adapter, message: str) -> None:
    """The adapter's config.json is refused in one line naming `message` (what transformers cannot express)."""
    with pytest.raises(CheckpointError, match=message) as e:
        adapter.hf_config()
    assert "\n" not in str(e.value) and "cannot express this" in str(e.value)
