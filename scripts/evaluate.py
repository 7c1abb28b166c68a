#!/usr/bin/env python
"""OLMo's downstream tasks (ai2-olmo-eval) on a checkpoint: our DCP step folder, a dcp_to_torch .pt, or an HF folder.

    python scripts/evaluate.py --checkpoint outputs/x/checkpoint/step-1000 [--tasks olmo1_core] [--limit 100] [--json]
    python scripts/evaluate.py --checkpoint hf_folder --tasks arc_easy,piqa --tokenizer tokenizer.json

Model args come from --config/--flavor, else from the step folder's .complete marker or the HF folder's
config.json; the tokenizer from --tokenizer, else the HF folder's tokenizer.json, the one the marker names (the
run's), the config's, else the bundled one. Prints one line per task (task, metric, value) and, with --json, one
JSON object as the last line: {"results": {task: ICLMetric.compute()'s keys and values}}. Runs in one process on
the CPU or one GPU, the same scoring as [downstream_eval] in training (docs/evaluation.md); under torchrun
(`torchrun --nproc_per_node N scripts/evaluate.py ...`) the model is FSDP-sharded over the N processes, each loading
only its shards of a DCP or HF checkpoint, and the documents are split among them; rank 0 prints.
"""
from __future__ import annotations

import argparse
import functools
import json

import torch
from _checkpoint_cli import add_model_flags, checkpoint_kind, load_model, main_guard, model_for, tokenizer_for

from torchtitan.components.downstream import build_tasks, check_task_tokens, primary_metric, resolve_tasks
from torchtitan.components.tokenizer import build_tokenizer, check_vocab_fits
from torchtitan.config.job_config import ActivationCheckpoint, Compile, Parallelism
from torchtitan.distributed.data_parallel import FSDPSettings
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import init_distributed
from torchtitan.models.common.parallelize import parallelize_decoder
from torchtitan.tools.device import detect_device_type, local_device
from torchtitan.tools.errors import ConfigError
from torchtitan.trainer.downstream_eval import BatchShape, DownstreamEvaluator
from torchtitan.trainer.step import ModelRunner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step folder, .pt file (dcp_to_torch or Meta), or HF folder")
    p.add_argument("--tasks", default="olmo1_core", help="comma-separated ai2-olmo-eval task labels and named sets "
                   "(olmo1_core, olmes_rc_5shot, olmes_mc_5shot_fast, mmlu)")
    p.add_argument("--limit", type=int, default=0, help="documents per task, the first in the task's order (0: all)")
    p.add_argument("--tokenizer", help="tokenizer path (tokenizer.json, tiktoken or sentencepiece model, or a folder)")
    p.add_argument("--model-ctx-len", type=int, default=0, help="longest input; longer prompts lose their start "
                   "(0: the model's max_seq_len)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward")
    p.add_argument("--json", action="store_true", help="end with one JSON line of every task's metric values")
    add_model_flags(p)
    a = p.parse_args()
    if a.limit < 0 or a.batch_tokens < 1 or a.model_ctx_len < 0:
        raise ConfigError("--limit and --model-ctx-len must be >= 0 and --batch-tokens >= 1")

    labels = resolve_tasks([t.strip() for t in a.tasks.split(",") if t.strip()], "--tasks")
    kind = checkpoint_kind(a.checkpoint)
    info = model_for(a, kind)
    args = info.args
    tok_path = tokenizer_for(a, kind, info)
    tokenizer = build_tokenizer(tok_path)
    check_vocab_fits(tokenizer, args.vocab_size, tok_path)
    ctx = min(a.model_ctx_len or args.max_seq_len, args.max_seq_len)
    tasks = build_tasks(labels, tokenizer, ctx, a.limit)
    check_task_tokens(tasks, args.vocab_size, f"--tasks with tokenizer {tok_path}")

    device_type = detect_device_type()
    rank, world = init_distributed(device_type, init_timeout_seconds=600)
    try:
        device = local_device(device_type)
        dims = ParallelDims.from_config(Parallelism(), world)  # every process a data-parallel FSDP shard
        shard = None
        if world > 1:
            dims.build_mesh(device_type)
            shard = functools.partial(
                parallelize_decoder, dims=dims, parallelism=Parallelism(), activation_checkpoint=ActivationCheckpoint(
                    mode="none"), compile=Compile(enable=False),
                fsdp=FSDPSettings(param_dtype=torch.float32, reduce_dtype=torch.float32, reshard_after_forward=True))
        model = load_model(a, kind, info, device, shard)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        evaluator = DownstreamEvaluator(tasks, BatchShape(a.batch_tokens, 0, 64, ctx), pad,
                                        dp_rank=dims.local_rank("dp"), dp=dims.dp)
        result = evaluator.run(ModelRunner([model], None, device))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0

    width = max(len(label) for label in result.results)
    print(f"{'task':<{width}}  {'metric':<12}  value")
    for label, values in result.results.items():
        key = primary_metric(result.metric_types[label])
        print(f"{label:<{width}}  {key:<12}  {values[key]:.4f}")
    print(f"{len(tasks)} tasks, {result.documents:,} documents, {result.seconds:.1f}s")
    if a.json:
        print(json.dumps({"results": result.results}))
    return 0


if __name__ == "__main__":
    main_guard(main)
