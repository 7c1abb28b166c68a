"""ExpertBalance (trainer/balance.py): the auxiliary-loss-free expert-bias update, on a tiny MoE layer."""
from __future__ import annotations

import torch

from tests.moe_helpers import DIM, E, tiny_moe
from torchtitan.config.job_config import MoETraining, Parallelism
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.trainer.balance import ExpertBalance


def test_expert_bias_update_moves_load_toward_balance_unless_skipped():
    moe = tiny_moe("sigmoid", expert_bias=True)
    moe.router.expert_bias = torch.zeros(E, dtype=torch.float32)
    dims = ParallelDims.from_config(Parallelism(), 1)
    balance = ExpertBalance([torch.nn.ModuleDict({"moe": moe})], MoETraining(expert_bias_update_rate=0.01), dims,
                            global_tokens=40, device=torch.device("cpu"))
    balance.begin_step(None)
    moe(torch.randn(40, DIM, dtype=torch.float64))
    counts = moe.balance.counts.clone()
    balance.end_step(torch.tensor(True))
    assert torch.equal(moe.router.expert_bias, torch.zeros(E))  # a skipped step leaves the bias
    balance.end_step(torch.tensor(False))
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.router.expert_bias, expected.float())
    metrics = balance.metrics()
    assert metrics["expert_imbalance"] == round((counts.max() / counts.mean()).item(), 4)
