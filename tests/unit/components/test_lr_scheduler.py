import math

import pytest
import torch

from torchtitan.components.lr_scheduler import build_lr_schedulers, grad_clip_max_norm, lr_factor
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
    # A second-stage anneal: no warm-up, linear decay over the whole run, from the peak at step 1 to 0 at the last.
    factors = [f(s, warmup_steps=0, decay_ratio=1.0) for s in range(1, 101)]
    assert factors[0] == 1.0 and factors[-1] == 0.0
    assert factors[1] == pytest.approx(1 - 1 / 99) and factors[50] == pytest.approx(1 - 50 / 99)
    # With a stable phase, its steps hold the peak and the decay ends at the last step as before.
    assert f(50, warmup_steps=0, decay_ratio=0.5) == 1.0 and f(100, warmup_steps=0, decay_ratio=0.5) == 0.0


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


def _olmo_clip_threshold(step: int, max_norm: float, warmup_steps: int, factor: float) -> float:
    """allenai/OLMo as it runs: olmo/train.py train_step clips with the param groups' max_grad_norm, then sets it
    to Scheduler.get_max_grad_norm(max_grad_norm, global_step) for the next step (olmo/optim.py
    _get_max_grad_norm_coeff: the factor while step <= grad_clip_warmup_steps); the groups start at
    max_grad_norm (get_param_groups)."""
    group_value = max_norm
    for s in range(1, step + 1):
        clip = group_value
        group_value = max_norm if s > warmup_steps else factor * max_norm
    return clip


@pytest.mark.parametrize("warmup,factor", [(5, 10.0), (1, 5.0), (0, 10.0)])
def test_grad_clip_warmup_follows_olmo(warmup, factor):
    for step in range(1, warmup + 5):
        assert grad_clip_max_norm(step, 1.0, warmup, factor) == _olmo_clip_threshold(step, 1.0, warmup, factor), step
    # OLMo 7B (OLMo-7B.yaml: 1000 steps, factor 10): step 1 and 1002 on clip at 1.0, steps 2..1001 at 10.
    assert [grad_clip_max_norm(s, 1.0, 1000, 10.0) for s in (1, 2, 1001, 1002)] == [1.0, 10.0, 10.0, 1.0]


def test_grad_clip_without_warmup_or_clipping_is_max_norm():
    assert grad_clip_max_norm(2, 1.0, None, None) == 1.0
    assert grad_clip_max_norm(2, 0.0, 10, 5.0) == 0.0  # clipping off stays off
    opts = build_optimizers([torch.nn.Linear(2, 2)], Optimizer(), "cpu")
    sched = build_lr_schedulers(opts, LRScheduler(grad_clip_warmup_steps=3, grad_clip_warmup_factor=4.0), 10)
    assert [sched.max_norm(s, 0.5) for s in range(1, 6)] == [0.5, 2.0, 2.0, 2.0, 0.5]
