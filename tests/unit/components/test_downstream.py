"""Task sets, request batching and the metric's states (components/downstream.py)."""
from __future__ import annotations

import pytest

from torchtitan.components.downstream import (
    TASK_SETS,
    ScoreBatch,
    Task,
    known_task_labels,
    plan_batches,
    resolve_tasks,
)
from torchtitan.datasets import IGNORE_INDEX
from torchtitan.tools.errors import ConfigError

pytest.importorskip("olmo_eval")


def test_every_set_names_known_tasks():
    known = set(known_task_labels())
    for name, labels in TASK_SETS.items():
        assert set(labels) <= known, (name, set(labels) - known)
    assert len(TASK_SETS["olmo1_core"]) == 9


def test_sets_expand_in_order_each_label_once():
    assert resolve_tasks(["copa", "olmo1_core"], "k")[:3] == ["copa", "arc_challenge", "arc_easy"]
    assert len(resolve_tasks(["olmo1_core", "copa"], "k")) == 9


@pytest.mark.parametrize("names,match", [(["olmo_core"], "did you mean 'olmo1_core'"), ([], "is empty")])
def test_bad_task_names_are_one_line(names, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve_tasks(names, "downstream_eval.tasks")
    assert "\n" not in str(e.value) and "downstream_eval.tasks" in str(e.value)


def _task(pairs) -> Task:
    class R:  # what Task.targets reads
        def __init__(self, q, c):
            self.query, self.continuation, self.dc_query = q, c, ()
    return Task("t", "acc", [R(q, c) for q, c in pairs])


def test_shared_queries_are_one_row_longest_first_within_the_token_budget():
    ctx = (5, 6, 7)
    tasks = [_task([(ctx, (8,)), (ctx, (9,)), ((1,) * 70, (2, 3)), ((4,), (4,))])]
    batches = plan_batches(tasks, batch_tokens=256, max_rows=0, align=64, max_len=512)
    # the 70-token row pads to 128: two rows fit 256 tokens; the other one-token prompt starts a new batch
    assert [b.rows for b in batches] == [[(1,) * 70, ctx], [(4,)]]
    assert batches[0].continuations[1] == [(8,), (9,)]  # both choices from one forward


def test_targets_sit_where_the_model_predicts_each_continuation_token():
    b = ScoreBatch([(10, 11, 12)], [[(12, 13), (14, 15)]])  # query = context (10, 11) + continuation[:-1]
    inputs, targets = b.tensors(8, pad_id=0, rows=2)
    assert inputs.tolist()[0] == [10, 11, 12, 0, 0, 0, 0, 0] and inputs[1].eq(0).all()
    assert targets.shape == (2, 8, 2)
    assert targets[0, 1:3, 0].tolist() == [12, 13] and targets[0, 1:3, 1].tolist() == [14, 15]
    assert (targets[0, [0, 3, 4], :] == IGNORE_INDEX).all() and (targets[1] == IGNORE_INDEX).all()
