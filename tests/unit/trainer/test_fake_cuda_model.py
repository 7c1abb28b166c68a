"""The debug model on fake CUDA (tests/fake_cuda.py): moved off the meta device, initialized with CUDA buffers, run
forward with the loss, in float32 and under the bf16 autocast the plan picks for one GPU; every parameter, buffer
and op stays on CUDA. Also the plan's mixed-precision decisions for device_type "cuda"."""
from __future__ import annotations

import pytest
import torch

from tests.fake_cuda import CUDA, assert_no_cpu_tensors, fake_cuda, overwrite_params_on_conversion
from torchtitan.components.loss import cross_entropy_sum
from torchtitan.config.job_config import JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.models.common.init import ParameterInit
from torchtitan.trainer.plan import autocast_dtype, fsdp_settings

SEQ = 64


@pytest.fixture
def no_draws(monkeypatch):
    """init_weights draws each parameter from a torch.Generator on its device; the CPU build cannot make a CUDA
    generator ("Cannot get CUDA generator without ATen_cuda library") and fake tensors hold no values, so the
    draws are skipped; the rest of init_weights (RoPE tables on the buffer device, the tie) runs."""
    monkeypatch.setattr(ParameterInit, "_fill", lambda self, p, draw: None)


def _meta_model():
    # Built outside the fake mode: a fake meta parameter could not be swapped for its CUDA copy.
    spec = get_train_spec("llama3")
    args = spec.model_args("debugmodel")
    args.max_seq_len = SEQ
    return spec.build_meta_model(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_debug_model_forward_and_loss_on_cuda(dtype, no_draws):
    """bfloat16: the parameters FSDP's mixed precision computes with. (torch.autocast("cuda") does not cast fake
    CUDA tensors on the CPU build: under it the logits stay float32, so the autocast path is not checked here.)"""
    model = _meta_model().to(dtype)  # on meta: fake parameters cannot be converted in place
    with overwrite_params_on_conversion(), fake_cuda() as ops:
        model.to_empty(device="cuda")
        model.init_weights(buffer_device=CUDA)
        # RoPE frequencies are computed on the host in float64 and moved once: the only CPU tensors at init.
        assert ops.cpu_ops and ops.cpu_ops[-1].startswith("aten._to_copy.default: ['cpu', 'cuda:0']")
        ops.cpu_ops.clear()
        tokens = torch.empty(2, SEQ, dtype=torch.int64, device="cuda")
        logits = model(tokens)
        loss = cross_entropy_sum(logits, tokens)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device == CUDA, name
    assert model.output.weight is model.tok_embeddings.weight or not model.args.tie_word_embeddings
    assert (logits.shape, logits.dtype) == ((2, SEQ, model.args.vocab_size), dtype)
    assert (loss.dtype, loss.device) == (torch.float32, CUDA)
    assert_no_cpu_tensors(ops)


def test_mixed_precision_decisions_on_cuda():
    cfg = JobConfig()
    cfg.training.mixed_precision_param = "bfloat16"
    one_gpu = ParallelDims.from_config(cfg.parallelism, 1)
    assert autocast_dtype(cfg, one_gpu, "cuda") == torch.bfloat16
    assert autocast_dtype(cfg, one_gpu, "cpu") is None
    fsdp = ParallelDims.from_config(cfg.parallelism, 2)
    if fsdp.fsdp_enabled:
        assert autocast_dtype(cfg, fsdp, "cuda") is None  # FSDP's param dtype casts instead
    assert fsdp_settings(cfg, fsdp, "cuda", dry_run=False).param_dtype == torch.bfloat16
    assert fsdp_settings(cfg, fsdp, "cpu", dry_run=False).param_dtype == torch.float32
    cfg.training.mixed_precision_param = "float32"
    assert autocast_dtype(cfg, one_gpu, "cuda") is None
