"""Every parallel layout reproduces single-process training (CPU, gloo, fp32, real processes).

All runs start from one seed checkpoint and see the same global batch (local
batch x dp is constant), so per-step losses must agree to float32 noise. The
`*_fresh` layouts start without it: initialization is layout-invariant
(models/common/init.py), so they must agree just the same. After a
few AdamW steps last-bit gradient noise grows, hence losses (not weights) are
compared, plus the first step's gradient norm.

Cost: each world size is one launch of parity_driver.py that trains all of its
layouts in one process group (a torchrun start-up costs ~7-12 s on 2 cores).
"""
from __future__ import annotations

import os

import pytest

from tests import launch

LOSS_TOL = 1e-5
GRAD_NORM_TOL = 1e-5
COMPILE_TOL = 1e-4


def _bs(n: int) -> list[str]:
    """Local batch n for training and validation: dp x n stays 4 (the global batch) on every layout."""
    return ["--training.local_batch_size", str(n), "--validation.local_batch_size", str(n)]


def _ac(mode: str, option: str | None = None) -> list[str]:
    return ["--activation_checkpoint.mode", mode, *(["--activation_checkpoint.selective_ac_option", option] if option
                                                     else [])]


FSDP = ["--parallelism.data_parallel_shard_degree", "-1"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
CP4 = ["--parallelism.context_parallel_degree", "4"]
ZLOSS = ["--training.z_loss_multiplier", "1e-3"]
# Document masking with per-document RoPE positions: pydoc windows hold several EOS-delimited documents.
DOCS = ["--training.document_masking", "--training.document_rope_restart"]
# OLMo 3's debug flavor (window 64 on three of four layers) at 256 tokens: windows cross CP chunk boundaries.
# Fresh init (no seed checkpoint of this family); global batch 4 x 256.
OLMO3 = ["--model.name", "olmo3", "--training.seq_len", "256", "--checkpoint.initial_load_path", "none"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
FRESH = ["--checkpoint.initial_load_path", "none"]  # initialized from training.seed, no seed checkpoint
# 48-token chunks do not divide a rank's 128 tokens: the last chunk is short.
FUSED = ["--training.loss_chunk_size", "48", "--training.fused_output_loss"]

# name -> (world size, CLI overrides, reference layout, tolerance). Global batch 4 x 64 tokens everywhere,
# except the gradient-accumulation pair (global batch 8).
LAYOUTS: dict[str, tuple[int, list[str], str, float]] = {
    "single": (1, _bs(4), "single", 0.0),
    "single_bs8": (1, _bs(8), "single_bs8", 0.0),
    "single_zloss": (1, _bs(4) + ZLOSS, "single_zloss", 0.0),
    "fsdp2": (2, FSDP + _bs(2), "single", LOSS_TOL),
    "fsdp2_reshard_never": (2, FSDP + _bs(2) + ["--parallelism.fsdp_reshard_after_forward", "never"], "single",
                            LOSS_TOL),
    "ddp2": (2, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
             + _bs(2), "single", LOSS_TOL),
    "tp2": (2, TP2 + _bs(4), "single", LOSS_TOL),
    "tp2_no_loss_parallel": (2, TP2 + _bs(4) + ["--parallelism.disable_loss_parallel"], "single", LOSS_TOL),
    "tp2_zloss": (2, TP2 + _bs(4) + ZLOSS, "single_zloss", LOSS_TOL),  # z-loss on vocab-sharded logits
    "cp2": (2, CP2 + _bs(4), "single", LOSS_TOL),
    "cp2_allgather": (2, CP2 + _bs(4) + ["--parallelism.context_parallel_rotate_method", "allgather"], "single",
                      LOSS_TOL),
    "cp4": (4, CP4 + _bs(4), "single", LOSS_TOL),
    "single_docs": (1, _bs(4) + DOCS, "single_docs", 0.0),
    "cp2_docs": (2, CP2 + _bs(4) + DOCS, "single_docs", LOSS_TOL),
    "fsdp2_cp2_docs_allgather": (4, FSDP + CP2 + _bs(2) + DOCS + ["--parallelism.context_parallel_rotate_method",
                                                                  "allgather"], "single_docs", LOSS_TOL),
    "single_olmo3": (1, _bs(4) + OLMO3, "single_olmo3", 0.0),
    "cp2_olmo3": (2, CP2 + _bs(4) + OLMO3, "single_olmo3", LOSS_TOL),
    "cp4_olmo3_docs": (4, CP4 + _bs(4) + OLMO3 + DOCS, "single_olmo3_docs", LOSS_TOL),
    "single_olmo3_docs": (1, _bs(4) + OLMO3 + DOCS, "single_olmo3_docs", 0.0),
    "fsdp2_full_ac": (2, FSDP + _bs(2) + _ac("full"), "single", LOSS_TOL),
    "fsdp2_selective_layer_ac": (2, FSDP + _bs(2) + _ac("selective", "2"), "single", LOSS_TOL),
    "fsdp2_selective_op_ac": (2, FSDP + _bs(2) + _ac("selective", "op"), "single", LOSS_TOL),
    "fsdp2_grad_accum2": (2, FSDP + ["--training.local_batch_size", "2", "--validation.local_batch_size", "4",
                                     "--training.global_batch_size", "8"], "single_bs8", LOSS_TOL),
    "fsdp2_compile": (2, FSDP + _bs(2) + ["--compile.enable"], "single", COMPILE_TOL),
    "fsdp2_fused_loss": (2, FSDP + _bs(2) + FUSED + ZLOSS, "single_zloss", LOSS_TOL),
    "cp2_fused_loss_compile": (2, CP2 + _bs(4) + FUSED + ["--compile.enable"], "single", COMPILE_TOL),
    # The loss stays eager under TP: preflight rejects a compiled loss under loss_parallel (wrong in torch 2.13).
    "tp2_compile": (2, TP2 + _bs(4) + ["--compile.enable", "--compile.components", "model"], "single", COMPILE_TOL),
    "hsdp2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "2"] + _bs(1), "single", LOSS_TOL),
    "fsdp2_tp2": (4, FSDP + TP2 + _bs(2), "single", LOSS_TOL),
    "fsdp2_cp2": (4, FSDP + CP2 + _bs(2), "single", LOSS_TOL),
    "tp2_cp2": (4, TP2 + CP2 + _bs(4), "single", LOSS_TOL),
    "single_fresh": (1, _bs(4) + FRESH, "single_fresh", 0.0),
    "fsdp2_fresh": (2, FSDP + _bs(2) + FRESH, "single_fresh", LOSS_TOL),
    "tp2_fresh": (2, TP2 + _bs(4) + FRESH, "single_fresh", LOSS_TOL),
    "cp2_fresh": (2, CP2 + _bs(4) + FRESH, "single_fresh", LOSS_TOL),
    "pp2_fresh": (2, PP2 + _bs(4) + FRESH, "single_fresh", LOSS_TOL),
    "fsdp2_tp2_fresh": (4, FSDP + TP2 + _bs(2) + FRESH, "single_fresh", LOSS_TOL),
}
COMPARED = [name for name, (_, _, ref, _) in LAYOUTS.items() if ref != name]


def _common(seed: str) -> list[str]:
    return ["--job.config_file", launch.DEBUG_CONFIG, *launch.TINY,
            "--checkpoint.enable", "--checkpoint.initial_load_path", seed, "--metrics.enable_jsonl=false",
            "--comm.init_timeout_seconds", "120", "--comm.train_timeout_seconds", "60",
            # Validation at steps 2, 4 and 5 on 2 global batches of held-out windows (the pydoc corpus).
            "--validation.enable", "--validation.freq", "2", "--validation.steps", "2", "--validation.seq_len", "64"]


def _run_world(world: int, seed: str, tmp: str) -> dict:
    layouts = {name: args for name, (w, args, _, _) in LAYOUTS.items() if w == world}
    spec = {"common": _common(seed), "dump_root": os.path.join(tmp, f"runs{world}"), "layouts": layouts}
    proc, results = launch.run_parity_driver(world, spec, os.path.join(tmp, f"spec{world}.json"),
                                             os.path.join(tmp, f"out{world}.json"))
    if proc.returncode != 0:
        missing = sorted(set(layouts) - set(results))
        results["_error"] = (f"world {world} driver failed ({proc.returncode}) before {missing}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return results


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("parity"))
    seed = launch.make_seed_checkpoint(os.path.join(tmp, "seed"))
    results: dict = {}
    errors = []
    for world in (1, 2, 4):
        out = _run_world(world, seed, tmp)
        if "_error" in out:
            errors.append(out.pop("_error"))
        results.update(out)
    results["_errors"] = errors
    _print_summary(results)
    return results


def _diffs(results: dict, name: str) -> tuple[float, float, float]:
    """Max |d loss| over the 5 steps, |d grad norm| at step 1, max |d validation loss| over the 3 validations."""
    ref = results[LAYOUTS[name][2]]
    got = results[name]
    assert len(got["loss"]) == len(ref["loss"]) == 5, f"{name}: expected 5 logged steps, got {len(got['loss'])}"
    assert len(got["validation_loss"]) == len(ref["validation_loss"]) == 3, got["validation_loss"]
    loss = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    val = max(abs(a - b) for a, b in zip(got["validation_loss"], ref["validation_loss"]))
    return loss, abs(got["grad_norm"][0] - ref["grad_norm"][0]), val


def _print_summary(results: dict) -> None:
    lines = ["layout                      max|dloss|   |dgradnorm1|   max|dval|   seconds"]
    for name in COMPARED:
        if name in results and LAYOUTS[name][2] in results:
            loss, gn, val = _diffs(results, name)
            lines.append(f"{name:<26}  {loss:10.2e}   {gn:10.2e}   {val:9.2e}   {results[name]['seconds']:7.1f}")
    print("\n" + "\n".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPARED)
def test_layout_matches_single_process(parity: dict, name: str):
    if name not in parity or LAYOUTS[name][2] not in parity:
        pytest.fail(f"{name} did not run:\n" + "\n".join(parity["_errors"]))
    tol = LAYOUTS[name][3]
    loss, grad_norm, val = _diffs(parity, name)
    ref = parity[LAYOUTS[name][2]]
    assert loss <= tol, f"{name}: losses {parity[name]['loss']} vs reference {ref['loss']} (max diff {loss:.2e})"
    assert grad_norm <= tol, (f"{name}: first grad norm {parity[name]['grad_norm'][0]} vs reference "
                              f"{ref['grad_norm'][0]} (diff {grad_norm:.2e})")
    assert val <= tol, (f"{name}: validation losses {parity[name]['validation_loss']} vs reference "
                        f"{ref['validation_loss']} (max diff {val:.2e})")


@pytest.mark.slow
def test_layouts_train(parity: dict):
    """Guards against vacuous parity: the reference itself learns over the 5 steps."""
    losses = parity["single"]["loss"]
    assert losses[-1] < losses[0] - 0.3, losses
