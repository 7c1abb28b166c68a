"""The evaluator's scores give ai2-olmo-eval's own metric for every metric type (trainer/downstream_eval.py).

The reference is the library's collate_fn + ICLMetric.update on the same model's logits; olmo1_core's types (acc,
len_norm) are covered against transformers in tests/integration/test_evaluate.py, here the others: ce_loss, bpb,
f1, pmi_dc and fast multiple choice."""
from __future__ import annotations

import os

import pytest
import torch

from torchtitan.components.downstream import Task, _requests, task_tokenizer
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.models import get_train_spec
from torchtitan.trainer.downstream_eval import BatchShape, DownstreamEvaluator
from torchtitan.trainer.step import ModelRunner

olmo_eval = pytest.importorskip("olmo_eval")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LIMIT = 8


@pytest.fixture(scope="module")
def setup():
    spec = get_train_spec("llama3")
    args = spec.model_args("debugmodel")
    model = spec.build_meta_model(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"), seed=0)
    return model.eval(), build_tokenizer(os.path.join(ROOT, "torchtitan", "assets", "tokenizer")), args.max_seq_len


def _library_tasks(tok, ctx):
    from olmo_eval import tasks as T

    wrapped = task_tokenizer(tok)
    return {"arc_easy_ppl": olmo_eval.build_task("arc_easy_ppl", wrapped, model_ctx_len=ctx),  # ce_loss
            "mmlu_stem_bpb": olmo_eval.build_task("mmlu_stem_bpb", wrapped, model_ctx_len=ctx),  # bpb
            "mrpc": olmo_eval.build_task("mrpc", wrapped, model_ctx_len=ctx),  # f1
            "arc_easy_pmi_dc": T.ArcEasy(wrapped, model_ctx_len=ctx, metric_type="pmi_dc"),
            "csqa_val_mc_5shot_fast": olmo_eval.build_task("csqa_val_mc_5shot_fast", wrapped, model_ctx_len=ctx)}


def test_every_metric_type_matches_the_library(setup):
    model, tok, ctx = setup
    library = _library_tasks(tok, ctx)
    tasks = [Task(label, t.metric_type, [r for s in t.samples if s["doc_id"] < LIMIT for r in _requests(s)])
             for label, t in library.items()]
    assert {t.metric_type for t in tasks} == {"ce_loss", "bpb", "f1", "pmi_dc", "acc"}
    ev = DownstreamEvaluator(tasks, BatchShape(batch_tokens=2048, max_rows=0, align=64, max_len=ctx), tok.eos_id)
    ours = ev.run(ModelRunner([model], None, torch.device("cpu"))).results
    for label, task in library.items():
        metric = olmo_eval.ICLMetric(metric_type=task.metric_type)
        samples = [s for s in task.samples if s["doc_id"] < LIMIT]
        for i in range(0, len(samples), 4):
            batch = task.collate_fn(samples[i:i + 4])
            with torch.no_grad():
                dc = model(batch["dc_input_ids"]) if task.metric_type == "pmi_dc" else None
                metric.update(batch, model(batch["input_ids"]), dc)
        want = {k: float(v) for k, v in metric.compute().items()}
        assert ours[label].keys() == want.keys(), label
        for key, v in want.items():
            assert ours[label][key] == pytest.approx(v, rel=1e-5, abs=1e-7), (label, key)


def test_dp_ranks_split_the_batches_and_pad_to_equal_counts(setup):
    _, tok, ctx = setup
    task = olmo_eval.build_task("copa", task_tokenizer(tok), model_ctx_len=ctx)
    tasks = [Task("copa", "acc", [r for s in task.samples if s["doc_id"] < 5 for r in _requests(s)])]
    shape = BatchShape(batch_tokens=128, max_rows=0, align=64, max_len=ctx)
    ranks = [DownstreamEvaluator(tasks, shape, tok.eos_id, dp_rank=r, dp=3) for r in range(3)]
    n = len(ranks[0].batches)
    assert n > 3 and len({len(r.mine) for r in ranks}) == 1
    assert sorted(i for r in ranks for i in r.mine) == list(range(-(-n // 3) * 3))
