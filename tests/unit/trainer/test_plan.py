"""Parallelism settings that cannot be honoured fail at config time with the key and the fix."""
from __future__ import annotations

from torchtitan.config import load_config
from torchtitan.trainer.plan import make_plan


def _cfg(*args: str):
    return load_config(["--model.flavor", "debugmodel", "--training.seq_len", "64", *args], env={})


def test_compiled_loss_stays_eager_under_loss_parallel():
    """torch 2.13 gets a compiled cross-entropy on vocab-sharded logits wrong: that loss stays eager,
    and the shipped configs (compile model + loss, TP) stay valid."""
    from torchtitan.trainer.plan import compile_loss_enabled

    tp_lp = _cfg("--parallelism.tensor_parallel_degree", "2", "--compile.enable")
    make_plan(tp_lp, 2)
    assert not compile_loss_enabled(tp_lp, 2)
    assert compile_loss_enabled(_cfg("--parallelism.tensor_parallel_degree", "2", "--compile.enable",
                                     "--parallelism.disable_loss_parallel"), 2)
    assert compile_loss_enabled(_cfg("--compile.enable"), 1)
    assert not compile_loss_enabled(_cfg("--compile.enable", "--compile.components", "model"), 1)
