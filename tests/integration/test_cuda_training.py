"""The trainer on a real GPU (run by scripts/gpu_check.sh with -m cuda; skipped without one): the debug model
trains in bf16 mixed precision eagerly and compiled, with the fused loss, and the two agree at step 1."""
from __future__ import annotations

import math

import pytest
import torch

from tests.launch import TINY, read_metrics, run_train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ON_GPU = {"TORCHTITAN_FORCE_CPU": "0"}


@pytest.mark.parametrize("extra", [[], ["--compile.enable"],
                                   ["--training.loss_chunk_size", "64", "--training.fused_output_loss"]],
                         ids=["eager", "compile", "fused_loss"])
def test_debug_model_trains_on_cuda(tmp_path, extra):
    dump = str(tmp_path / "run")
    run_train(dump, [*TINY, "--training.mixed_precision_param", "bfloat16", *extra], env=ON_GPU)
    eager = str(tmp_path / "eager")
    run_train(eager, [*TINY, "--training.mixed_precision_param", "bfloat16"], env=ON_GPU)
    a, b = read_metrics(dump), read_metrics(eager)
    assert all(math.isfinite(r["loss"]) for r in a) and a[-1]["loss"] < a[0]["loss"]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=2e-2)  # bf16: kernels differ, the step-1 loss agrees
