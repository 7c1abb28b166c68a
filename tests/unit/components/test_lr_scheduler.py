import math

import pytest
import torch

from torchtitan.components.lr_scheduler import build_lr_schedulers, lr_factor
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config.job_config import LRScheduler, Optimizer


def f(step, **kw):
    base = dict(warmup_steps=10, total_steps=100, decay_ratio=None, decay_type="linear", min_lr_factor=0.0)
    base.update(kw)
    return lr_factor(step, **base)


def test_warmup_is_linear_and_starts_above_zero():
    assert f(1) == pytest.approx(1 / 11)
    assert f(10) == pytest.approx(10 / 11)
    assert all(f(s) < f(s + 1) for s in range(1, 10))


@pytest.mark.parametrize("kind,mid", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_decay_shapes(kind, mid):
    assert f(55, decay_type=kind) == pytest.approx(mid)
    assert f(100, decay_type=kind) == pytest.approx(0.0)


def test_stable_phase_and_min_lr():
    kw = dict(decay_ratio=0.2, min_lr_factor=0.1)
    assert f(11, **kw) == 1.0 and f(80, **kw) == 1.0
    assert f(90, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100, **kw) == pytest.approx(0.1)


def test_anneal_stage_linear_to_zero():
    # A second-stage anneal: no warm-up, linear decay to 0 over the whole run.
    assert f(1, warmup_steps=0, decay_ratio=1.0) == pytest.approx(0.99)
    assert f(100, warmup_steps=0, decay_ratio=1.0) == 0.0


def test_scheduler_drives_optimizer_and_resumes():
    model = torch.nn.Linear(2, 2)
    cfg = LRScheduler(warmup_steps=2, decay_type="linear")
    opts = build_optimizers([model], Optimizer(lr=1.0), "cpu")
    sched = build_lr_schedulers(opts, cfg, total_steps=10)
    seen = []
    for _ in range(5):
        seen.append(opts.param_groups[0]["lr"])
        opts.step()
        sched.step()
    assert seen[:3] == pytest.approx([1 / 3, 2 / 3, 0.875])  # warm-up, then linear decay over 8 steps
    state = sched.state_dict()
    opts2 = build_optimizers([model], Optimizer(lr=1.0), "cpu")
    sched2 = build_lr_schedulers(opts2, cfg, total_steps=10)
    sched2.load_state_dict(state)
    assert opts2.param_groups[0]["lr"] == pytest.approx(opts.param_groups[0]["lr"])
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
