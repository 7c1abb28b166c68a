"""train_step in one process: the global-token normalization and the non-finite guard."""
from __future__ import annotations

import pytest
import torch

from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_sum
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config.job_config import LRScheduler, Optimizer, Parallelism
from torchtitan.distributed.fault_tolerance import SingleGroup
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models import get_train_spec
from torchtitan.tools.errors import TrainingDiverged
from torchtitan.trainer.guards import NonFiniteGuard, SpikeGuard
from torchtitan.trainer.step import ModelRunner, StepHooks, global_mean_loss, train_step

DIMS = ParallelDims.from_config(Parallelism(), 1)


def _model():
    spec = get_train_spec("llama3")
    args = spec.model_args("debugmodel")
    args.n_layers, args.max_seq_len = 2, 16
    torch.manual_seed(0)
    model = spec.build_model(args)
    model.init_weights()
    return model


def _batch(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2048, (n, 17), generator=g)
    labels = tokens[:, 1:].clone()
    # Ragged masking: micro-batches hold different numbers of labelled tokens.
    labels[torch.rand(labels.shape, generator=g) < torch.linspace(0.1, 0.8, n)[:, None]] = IGNORE_INDEX
    return tokens[:, :-1], labels


def _step(model, batches, optimizer, step: int = 1, guard: NonFiniteGuard | None = None, loss_fn=None):
    scheds = build_lr_schedulers(optimizer, LRScheduler(warmup_steps=0), 10)
    runner = ModelRunner([model], loss_fn or cross_entropy_sum, torch.device("cpu"))
    hooks = StepHooks(guard=guard or NonFiniteGuard(), groups=SingleGroup(""))
    return train_step(runner, batches, step=step, dims=DIMS, optimizers=optimizer, lr_schedulers=scheds,
                      max_norm=0.0, hooks=hooks)


def _sgd(model) -> OptimizersContainer:
    return OptimizersContainer([model], [torch.optim.SGD(model.parameters(), lr=1.0)])


def test_two_micro_batches_of_two_equal_one_of_four():
    inputs, labels = _batch(0, 4)
    one, two = _model(), _model()
    out1 = _step(one, [(inputs, labels)], _sgd(one))
    out2 = _step(two, [(inputs[:2], labels[:2]), (inputs[2:], labels[2:])], _sgd(two))
    assert int(out1.n_tokens) == int(out2.n_tokens) == int((labels != IGNORE_INDEX).sum())
    assert global_mean_loss(out1, DIMS) == pytest.approx(global_mean_loss(out2, DIMS), abs=1e-6)
    torch.testing.assert_close(out1.grad_norm, out2.grad_norm, atol=1e-6, rtol=1e-6)
    # SGD with lr 1 moves each weight by exactly its gradient: equal weights mean equal gradients.
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_autocast_runs_the_forward_in_the_compute_dtype():
    """mixed_precision_param where FSDP's policy does not apply (one GPU, DDP): the runner autocasts. The dtype
    choice per device is tested in tests/unit/config/test_effects.py; here the plumbing, on CPU."""
    model, seen = _model(), []

    def loss_fn(logits, labels):
        seen.append(logits.dtype)
        return cross_entropy_sum(logits, labels)

    runner = ModelRunner([model], loss_fn, torch.device("cpu"), autocast=torch.bfloat16)
    inputs, labels = _batch(0, 2)
    loss = runner.forward_backward(inputs, labels, torch.tensor(1.0))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and model.output.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_a_nan_step_is_not_applied_and_is_named(implementation):
    model = _model()
    optimizer = build_optimizers([model], Optimizer(lr=1e-3, implementation=implementation), "cpu")
    guard = NonFiniteGuard()
    bad = {"step": None}

    def loss_fn(logits, labels):
        loss = cross_entropy_sum(logits, labels)
        return loss * float("nan") if bad["step"] else loss

    _step(model, [_batch(1, 2)], optimizer, 1, guard, loss_fn)
    guard.check()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in next(iter(optimizer.optimizers[0].state.values())).items()}
    bad["step"] = 2
    out = _step(model, [_batch(2, 2)], optimizer, 2, guard, loss_fn)
    assert not torch.isfinite(out.grad_norm)
    bad["step"] = None
    _step(model, [_batch(3, 2)], optimizer, 3, guard, loss_fn)  # finite, but after a bad step: still skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    state_after = next(iter(optimizer.optimizers[0].state.values()))
    if implementation == "fused":  # the device-side skip leaves the moments and step count alone too
        assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    with pytest.raises(TrainingDiverged, match="nan/inf at step 2;"):
        guard.check()


def test_spike_guard_skips_an_injected_spike_and_goes_on():
    """A loss spike at step 9 is skipped (weights unchanged, counted); step 10 trains again."""
    model = _model()
    optimizer = build_optimizers([model], Optimizer(lr=1e-3), "cpu")
    guard, spikes = NonFiniteGuard(), SpikeGuard(sigma=4.0, window=8, device=torch.device("cpu"))
    spike_at = {9}

    for step in range(1, 11):
        def loss_fn(logits, labels, step=step):
            loss = cross_entropy_sum(logits, labels)
            return loss * 1000 if step in spike_at else loss  # a spike in loss and gradient norm alike

        before = {k: v.clone() for k, v in model.state_dict().items()}
        scheds = build_lr_schedulers(optimizer, LRScheduler(warmup_steps=0), 20)
        runner = ModelRunner([model], loss_fn, torch.device("cpu"))
        train_step(runner, [_batch(step, 2)], step=step, dims=DIMS, optimizers=optimizer, lr_schedulers=scheds,
                   max_norm=1.0, hooks=StepHooks(guard=guard, groups=SingleGroup(""), spike_guard=spikes))
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert unchanged == (step in spike_at), step
    guard.check()  # a spike is not a divergence
    assert int(spikes.skipped) == 1 and int(spikes.filled) == 8


def test_spike_guard_state_round_trips():
    a = SpikeGuard(3.0, 4, torch.device("cpu"))
    for loss in (1.0, 1.1, 0.9, 1.0, 1.05):
        a.skip(torch.tensor(loss), torch.tensor(1.0))
    b = SpikeGuard(3.0, 4, torch.device("cpu"))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for loss in (5.0, 1.0, 0.95):
        one = torch.tensor(1.0)
        assert bool(a.skip(torch.tensor(loss), one)) == bool(b.skip(torch.tensor(loss), one))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert int(a.skipped) == 1


def test_grad_clip_warmup_clips_at_the_warmup_threshold():
    """OLMo's grad-clip warm-up (2 steps, factor 10, max_norm 0.01): step 1 clips at 0.01, steps 2-3 at 0.1,
    step 4 at 0.01 again. SGD with lr 1 moves the weights by the clipped gradient: its norm is the threshold."""
    model = _model()
    optimizer = _sgd(model)
    scheds = build_lr_schedulers(optimizer, LRScheduler(warmup_steps=0, decay_ratio=0.0, grad_clip_warmup_steps=2,
                                                        grad_clip_warmup_factor=10.0), 10)
    runner = ModelRunner([model], cross_entropy_sum, torch.device("cpu"))
    hooks = StepHooks(guard=NonFiniteGuard(), groups=SingleGroup(""))
    moved = []
    for step in range(1, 5):
        before = [p.detach().clone() for p in model.parameters()]
        out = train_step(runner, [_batch(step, 2)], step=step, dims=DIMS, optimizers=optimizer, lr_schedulers=scheds,
                         max_norm=scheds.max_norm(step, 0.01), hooks=hooks)
        assert float(out.grad_norm) > 0.1  # the unclipped norm: every step is clipped
        moved.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.detach() - b) for p, b in zip(model.parameters(), before)]))))
    assert moved == pytest.approx([0.01, 0.1, 0.1, 0.01], rel=1e-3)  # float32 weight differences
