"""Shared by the checkpoint integration tests: a tiny HF Llama, and several trainings per launch."""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from typing import NamedTuple

import torch

from tests import launch

# Matches llama3 flavor "debugmodel": dim 256, 6 layers, 16 heads, 8 KV heads, FFN 768, vocab 2048.
CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=16,
              num_key_value_heads=8, vocab_size=2048, rope_theta=500000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False, max_position_embeddings=256,
              # Larger than HF's 0.02 so logits are well separated and greedy choices are robust.
              initializer_range=0.1)


def make_tiny_hf(folder: str, seed: int = 0, **save_kwargs):
    """Save the model to folder (save_pretrained kwargs, e.g. max_shard_size) and return it in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def run_layouts(tmp: str, world: int, common: list[str], layouts: dict[str, list[str]], tag: str) -> dict:
    """Train several configs in one launch of parity_driver.py (one torchrun start-up for all of them).

    Each layout trains in {tmp}/{tag}/{name}; returns {name: {"loss": [...], "grad_norm": [...]}}.
    """
    spec = {"common": ["--job.config_file", launch.DEBUG_CONFIG, *common], "dump_root": os.path.join(tmp, tag),
            "layouts": layouts}
    proc, results = launch.run_parity_driver(world, spec, os.path.join(tmp, f"{tag}.json"),
                                             os.path.join(tmp, f"{tag}.out.json"))
    assert proc.returncode == 0, f"world {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return results


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def script(name: str, *args, subprocess: bool = False) -> Result:
    """Run scripts/<name> as `python scripts/<name> args`; in this process unless asked (saves ~3 s of
    imports per call on 2 cores), with the same sys.argv, stdout/stderr and exit status."""
    argv = [os.path.join("scripts", name), *map(str, args)]
    if subprocess:
        p = launch.run_python(argv, timeout=300)
        return Result(p.returncode, p.stdout, p.stderr)
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [os.path.join(launch.ROOT, argv[0]), *argv[1:]], [os.path.join(launch.ROOT, "scripts")]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved
    return Result(code, out.getvalue(), err.getvalue())
