"""scripts/generate.py: greedy output equals transformers' generate on the same (converted) weights."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.checkpoint_helpers import make_tiny_hf, script
from tests.launch import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
PROMPT = [1, 17, 300, 42, 1999, 5]
NEW = 16


def generate(*args, subprocess: bool = False) -> dict:
    p = script("generate.py", *args, "--json", subprocess=subprocess)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_greedy_matches_transformers_from_hf_dcp_and_pt(tmp_path):
    hf_dir, dcp_dir, pt = tmp_path / "hf", tmp_path / "dcp", tmp_path / "model.pt"
    hf = make_tiny_hf(str(hf_dir))
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False)[0, len(PROMPT):]
    want = want.tolist()

    assert script("convert_hf_to_dcp.py", hf_dir, dcp_dir).returncode == 0
    dcp_to_torch_save(str(dcp_dir), str(pt))

    common = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW, "--ignore-eos"]
    from_hf = generate("--checkpoint", hf_dir, *common, subprocess=True)  # model args from config.json
    from_dcp = generate("--checkpoint", dcp_dir, *common)  # from the .complete marker
    from_pt = generate("--checkpoint", pt, "--config", os.path.join(ROOT, "train_configs", "debug_model.toml"), *common)
    assert from_hf["prompt_ids"] == PROMPT
    assert from_hf["generated_ids"] == want
    assert from_dcp["generated_ids"] == want
    assert from_pt["generated_ids"] == want

    # Sampling: reproducible by seed, and top-k 1 is greedy.
    sampled = [generate("--checkpoint", dcp_dir, "--prompt", "def f(x):", "--temperature", "0.8", "--top-k", "50",
                        "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "8") for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]["generated_ids"]) <= 8 and isinstance(sampled[0]["text"], str)


def test_greedy_matches_transformers_on_an_olmoe_hf_folder_and_its_step_folder(tmp_path):
    """Experts stacked on import (HF folder) and read as stored (the converted step folder): transformers' greedy
    OlmoeForCausalLM tokens both ways."""
    transformers = pytest.importorskip("transformers")
    hf_dir, dcp_dir = tmp_path / "hf", tmp_path / "dcp"
    cfg = transformers.OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_experts=8, num_experts_per_tok=2, vocab_size=2048, max_position_embeddings=128,
                                   pad_token_id=None, eos_token_id=None, bos_token_id=None, initializer_range=0.1)
    torch.manual_seed(0)
    hf = transformers.OlmoeForCausalLM(cfg).eval()
    hf.save_pretrained(str(hf_dir))
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False)[0, len(PROMPT):].tolist()
    assert script("convert_hf_to_dcp.py", hf_dir, dcp_dir).returncode == 0
    common = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW, "--ignore-eos"]
    assert generate("--checkpoint", hf_dir, *common)["generated_ids"] == want  # model args from config.json
    assert generate("--checkpoint", dcp_dir, *common)["generated_ids"] == want  # from the .complete marker
