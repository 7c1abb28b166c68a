"""RepetitionFilter: it drops exactly the instances OLMo-core's repetition filter masks, and nothing else."""
import dataclasses

import numpy as np
import pytest

from torchtitan.datasets.filters import RepetitionFilter
from torchtitan.tools.errors import ConfigError

SEQ = 512
PATTERN_VOCAB = 1000  # planted patterns use ids below this, backgrounds ids above: no accidental run extension


def background(rng, n=1, seq=SEQ):
    return rng.integers(PATTERN_VOCAB, 50_000, size=(n, seq)).astype(np.uint32)


def plant(row, pattern, copies, at, extra=0):
    """Write `copies` copies of `pattern` (plus `extra` tokens of one more copy) into `row` at `at`."""
    run = np.tile(np.asarray(pattern, dtype=row.dtype), copies + 1)[: len(pattern) * copies + extra]
    row[at : at + len(run)] = run
    return row


def distinct(rng, p):
    return rng.choice(PATTERN_VOCAB, size=p, replace=False)


def olmo_row_algorithm(seq, max_period, min_period):
    """A plain-Python restatement of OLMo-core's find_periodic_sequences: the `times` of each run it reports.

    Per period it cuts the sequence (padded with -1) into rows of `period` tokens, finds groups of
    rows equal to the row before (row 0 is compared with the last row, as np.roll does), widens each
    group by the matching tail of the row before and head of the row after, and reports runs of
    more than 2 periods.
    """
    n = len(seq)
    for p in range(min_period, min(max_period, n // 3) + 1):
        padded = list(seq) + [-1] * (p - n % p)
        rows = [padded[k : k + p] for k in range(0, len(padded), p)]
        eq = [[rows[r][j] == rows[r - 1][j] for j in range(p)] for r in range(len(rows))]
        full = [r for r in range(len(rows)) if all(eq[r])]
        groups = []
        for r in full:
            if groups and groups[-1][-1] == r - 1:
                groups[-1].append(r)
            else:
                groups.append([r])
        for group in groups:
            a, b = group[0], group[-1]
            trailing = next((k for k in range(p) if not eq[a - 1][p - 1 - k]), p)
            start = p - trailing if trailing > 0 else -1
            start_offset = p - start if start > 0 else 0
            end_offset = next((k for k in range(p) if not eq[b + 1][k]), p)
            times = ((b + 1) * p + end_offset - ((a - 1) * p - start_offset)) // p
            if times > 2:
                yield times


def olmo_drops(seq, f):
    return any(t >= f.max_count for t in olmo_row_algorithm(seq, f.max_period, f.min_period))


def brute_force_drops(seq, f):
    """The plain definition: some p-token window is followed by enough copies of itself."""
    seq = [int(x) for x in seq]
    need = max(f.max_count, 3)
    for p in range(f.min_period, f.max_period + 1):
        for i in range(len(seq) - p + 1):
            copies = 1
            while copies < need and seq[i + copies * p : i + (copies + 1) * p] == seq[i : i + p]:
                copies += 1
            if copies >= need:
                return True
    return False


def test_removes_planted_degenerate_instances_and_nothing_else():
    rng = np.random.default_rng(0)
    f = RepetitionFilter()
    block = background(rng, 64, 2048)
    planted = {
        3: ([7], 40, 100),  # one token 40 times
        17: (distinct(rng, 3), 40, 1000),  # a 3-gram 40 times
        30: (distinct(rng, 13), 32, 1500),  # a 13-gram exactly max_count times
        63: (distinct(rng, 5), 32, 2048 - 5 * 32),  # ends the instance
        40: ([9], 2048, 0),  # the whole instance
    }
    kept = {
        5: ([7], 31, 10),  # one token max_count - 1 times
        8: (distinct(rng, 3), 31, 0),  # a 3-gram max_count - 1 times, from the first token
        9: (distinct(rng, 14), 40, 200),  # period above max_period
        12: (distinct(rng, 13), 31, 900),  # a 13-gram max_count - 1 times
    }
    for i, (pattern, copies, at) in {**planted, **kept}.items():
        plant(block[i], pattern, copies, at)
    assert sorted(np.flatnonzero(f.drop_mask(block))) == sorted(planted)


@pytest.mark.parametrize("p", [1, 2, 3, 7, 13])
def test_threshold_is_max_count_whole_copies(p):
    rng = np.random.default_rng(p)
    f = RepetitionFilter()
    pattern = distinct(rng, p)
    cases = {
        (32, 0): True,  # exactly max_count copies: dropped (>=)
        (31, 0): False,  # one fewer: kept
        (31, p - 1): False,  # a partial copy on top does not count
        (32, p - 1): True,
        (33, 0): True,
    }
    block = background(rng, len(cases))
    for row, (copies, extra) in zip(block, cases):
        plant(row, pattern, copies, 50, extra)
    assert f.drop_mask(block).tolist() == list(cases.values())


def test_period_bounds_apply_to_the_period_being_checked():
    rng = np.random.default_rng(1)
    block = background(rng, 4)
    plant(block[0], [5], 40, 0)  # period 1 only seen by p = 2 as 1 + 38 // 2 = 20 copies
    plant(block[1], [5], 64, 0)  # ... and 1 + 62 // 2 = 32 copies here
    plant(block[2], distinct(rng, 13), 36, 0)
    plant(block[3], distinct(rng, 14), 36, 0)
    assert RepetitionFilter(min_period=2).drop_mask(block).tolist() == [False, True, True, False]
    assert RepetitionFilter(max_period=12).drop_mask(block).tolist() == [True, True, False, False]


def test_counts_below_three_act_as_three_like_olmo_core():
    rng = np.random.default_rng(2)
    block = background(rng, 2)
    plant(block[0], distinct(rng, 4), 2, 10)
    plant(block[1], distinct(rng, 4), 3, 10)
    assert RepetitionFilter(max_count=2).drop_mask(block).tolist() == [False, True]


def test_any_block_size_and_dtype():
    rng = np.random.default_rng(3)
    f = RepetitionFilter()
    assert f.drop_mask(np.zeros((0, SEQ), dtype=np.uint32)).shape == (0,)
    assert f.drop_mask(np.zeros((2, 10), dtype=np.uint16)).tolist() == [False, False]  # too short to hold 32
    block = background(rng, 3)
    plant(block[1], [3, 4], 32, 7)
    for dtype in (np.uint16, np.uint32, np.int64):
        assert f.drop_mask(block.astype(dtype)).tolist() == [False, True, False]
    with pytest.raises(ValueError):
        f.drop_mask(block[0])


FILTERS = [RepetitionFilter(), RepetitionFilter(8, 1, 32), RepetitionFilter(5, 2, 4), RepetitionFilter(6, 3, 3)]


def random_instances(rng, f, n, seq):
    """Backgrounds (some from a 3-token vocab, which repeats by itself) with runs planted near the threshold."""
    rows = []
    for _ in range(n):
        vocab = 3 if rng.random() < 0.3 else 50_000
        row = rng.integers(0, vocab, size=seq)
        p = int(rng.integers(max(1, f.min_period - 1), f.max_period + 3))
        copies = int(rng.integers(max(1, f.max_count - 2), f.max_count + 2))
        pattern = rng.integers(0, int(rng.choice([2, 6, 50_000])), size=p)
        extra = int(rng.integers(0, p))
        if (copies + 1) * p <= seq and rng.random() < 0.9:
            plant(row, pattern, copies, int(rng.integers(0, seq - (copies + 1) * p + 1)), extra)
        rows.append(row)
    return np.stack(rows).astype(np.uint32)


@pytest.mark.parametrize("f", FILTERS, ids=str)
def test_agrees_with_olmo_core_definition_on_random_instances(f):
    rng = np.random.default_rng(f.max_period * 100 + f.min_period * 10 + f.max_count)
    block = random_instances(rng, f, 80, 448)
    got = f.drop_mask(block).tolist()
    assert got == [olmo_drops(row, f) for row in block]
    assert got[:40] == [brute_force_drops(row, f) for row in block[:40]]
    assert 0 < sum(got) < len(got)  # the sample exercises both sides


def test_agrees_with_olmo_core_itself():
    pytest.importorskip("torch")
    utils = pytest.importorskip("olmo_core.data.utils")
    for f in FILTERS:
        block = random_instances(np.random.default_rng(f.max_count), f, 60, 448)
        expected = [
            any(
                m.times >= f.max_count
                for m in utils.find_periodic_sequences(row.astype(np.int64), f.max_period, f.min_period)
            )
            for row in block
        ]
        assert f.drop_mask(block).tolist() == expected


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(min_period=0), "data.instance_filter_min_period"),
        (dict(min_period=4, max_period=3), "data.instance_filter_max_period"),
        (dict(max_count=1), "data.instance_filter_max_count"),
    ],
)
def test_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key) as err:
        RepetitionFilter(**kwargs)
    assert "\n" not in str(err.value)


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RepetitionFilter().max_count = 3
