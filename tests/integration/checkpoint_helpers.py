"""Shared by the checkpoint integration tests: a tiny HF Llama, several trainings per launch, trainer command
lines, a checkpoint re-saved in another layout, and DCP folders compared bitwise.

Run as a module (`torchrun ... -m tests.integration.checkpoint_helpers TRAINER ARGS`) it is the trainer whose
checkpoint manager saves again whatever it has just loaded: see `resave_in_layout`.
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests import launch

MOE_CONFIG = os.path.join(launch.ROOT, "train_configs", "olmoe_debug.toml")

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


def train_argv(dump: str, args: list[str], nproc: int = 1, config: str = launch.DEBUG_CONFIG,
               module: str = "torchtitan.train") -> list[str]:
    """`python` arguments of one torchrun launch of the trainer (or of a module taking the trainer's flags)."""
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "localhost:0", "-m", module, "--job.config_file", config,
            "--job.dump_folder", dump, "--comm.init_timeout_seconds", "120", *args]


def resave_in_layout(src: str, dump: str, args: list[str], nproc: int, config: str) -> str:
    """Load the full checkpoint src into this layout (args on nproc processes) and save it again, by the trainer's
    own code, at its step and before any training; training then goes on to training.steps in dump as usual.

    src is read as checkpoint.initial_load_path with every state (optimizer, data, ...), so DCP reshards it to
    this layout; returns the new step folder under dump."""
    proc = launch.run_python(train_argv(
        dump, ["--checkpoint.enable_checkpoint", "--checkpoint.initial_load_path", src,
               "--checkpoint.initial_load_model_only=false", *args], nproc, config,
        module="tests.integration.checkpoint_helpers"))
    assert proc.returncode == 0, f"re-save on {nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    step = os.path.basename(os.path.normpath(src))
    return os.path.join(dump, "checkpoint", step)


def read_dcp(path: str, out: str) -> dict:
    """Every entry of a DCP folder (model, optimizer, ...) as plain tensors and objects, by the stock converter
    (through the file out)."""
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=True)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bitwise_differences(a: dict, b: dict) -> list[str]:
    """Every leaf of two nested state dicts that is not bitwise identical (dtype and shape included), with its
    max |difference|; [] when they are the same. Keys present on one side only count as differences."""
    fa, fb = _flat(a), _flat(b)
    out = [f"{k}: only in the {'first' if k in fa else 'second'}" for k in sorted(fa.keys() ^ fb.keys())]
    for k in sorted(fa.keys() & fb.keys()):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape:
                out.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not torch.equal(_bits(x), _bits(y)):
                diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "?"
                out.append(f"{k}: max |diff| {diff}")
        elif type(x) is not type(y) or x != y:
            out.append(f"{k}: {x!r:.80} vs {y!r:.80}")
    return out


def _save_on_load_main(argv: list[str]) -> int:
    """torchtitan.train.main whose checkpoint manager saves again, at the loaded step, what it has just loaded."""
    import torchtitan.train as trainer
    from torchtitan.checkpoint import CheckpointManager

    class SaveOnLoad(CheckpointManager):
        def load(self) -> int:
            step = super().load()
            if step > 0:
                # The trainer saves only after iter(dataloader). A StatefulDataLoader asked for its state before
                # that builds its iterator (kept for the next iter()), which draws a seed from the global RNG that
                # train_state then records: build it now and put the loaded RNG back, so the save holds what
                # was loaded.
                rng = torch.get_rng_state()
                self.states["dataloader"].state_dict()
                torch.set_rng_state(rng)
                self.save(step)
            return step

    # A test-only hook: train() builds its manager by this module-level name. The trainer has no "load and
    # save" mode, and a training step in between would make the saves differ by more than the reshard.
    trainer.CheckpointManager = SaveOnLoad
    return trainer.main(argv)


if __name__ == "__main__":
    sys.exit(_save_on_load_main(sys.argv[1:]))
