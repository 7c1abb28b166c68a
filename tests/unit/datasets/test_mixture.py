"""Source mixtures: shares, repetition caps, the one global order, layouts, the instance filter, the errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from torchtitan.config.job_config import Data, Source
from torchtitan.datasets.mixture import allocate, build_mixture_dataset, plan_sources
from torchtitan.tools.errors import DataError

SEQ = 16


def _write_source(folder, name: str, low: int, high: int, tokens: int, files: int = 2, seed: int = 0) -> str:
    """Token files whose ids lie in [low, high): a source's tokens say where they came from."""
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(files):
        rng.integers(low, high, tokens // files, dtype=np.uint16).tofile(os.path.join(folder, name, f"part-{k}.npy"))
    return os.path.join(folder, name, "*.npy")


def _three_sources(tmp_path, wiki_tokens: int = 60_000) -> list[Source]:
    return [Source("web", [_write_source(tmp_path, "web", 0, 600, 400_000)], target_ratio=0.6),
            Source("code", [_write_source(tmp_path, "code", 600, 1200, 200_000)], target_ratio=0.3),
            Source("wiki", [_write_source(tmp_path, "wiki", 1200, 2000, wiki_tokens)], target_ratio=0.1,
                   max_repetition=1.5)]


def _dataset(tmp_path, sources, *, steps: int, batch: int = 8, dp_rank: int = 0, dp: int = 1, dump="run",
             seed: int = 0, **data_kw):
    data = Data(dataset="memmap", sources=sources, **data_kw)
    return build_mixture_dataset(data, seq_len=SEQ, local_batch_size=batch // dp, global_batch_size=batch, seed=seed,
                                 dp_rank=dp_rank, dp_degree=dp, dump_folder=str(tmp_path / dump),
                                 budget=steps * batch)


def _take(ds, n: int) -> list[np.ndarray]:
    it = iter(ds)
    return [next(it)["input"].numpy() for _ in range(n)]


def test_allocation_is_exact_and_sums_to_the_budget():
    assert allocate([0.6, 0.3, 0.1], 8000) == [4800, 2400, 800]
    counts = allocate([1 / 3, 1 / 3, 1 / 3], 100)
    assert sum(counts) == 100 and sorted(counts) == [33, 33, 34]


def test_thousand_steps_shares_within_half_a_percent_and_the_cap_holds(tmp_path):
    steps, batch = 1000, 8
    sources = _three_sources(tmp_path)
    ds = _dataset(tmp_path, sources, steps=steps, batch=batch)
    seen = {name: np.zeros(len(s.instances), np.int64) for name, s in zip(ds.instances.names, ds.instances.shares)}
    order = np.asarray(ds.order.indices(0))
    assert len(order) == steps * batch
    src = ds.instances.source_of(order)
    offsets = np.cumsum([0] + [len(s.instances) for s in ds.instances.shares])
    for i, name in enumerate(ds.instances.names):
        np.add.at(seen[name], order[src == i] - offsets[i], 1)
    # What the trainer reads: every micro-batch of 1000 steps, and the per-source token accounting it logs.
    tokens = {}
    items = _take(ds, steps * batch)
    metrics = ds.take_source_metrics()
    for name, target in (("web", 0.6), ("code", 0.3), ("wiki", 0.1)):
        assert abs(metrics[f"data/{name}/share"] - target) < 0.005, (name, metrics)
        tokens[name] = metrics[f"data/{name}/tokens"]
    assert sum(tokens.values()) == steps * batch * (SEQ - 1)
    # The items really come from their sources (disjoint token ranges).
    ranges = {"web": (0, 600), "code": (600, 1200), "wiki": (1200, 2000)}
    by_range = {name: sum(int(lo <= x.min() and x.max() < hi) for x in items) for name, (lo, hi) in ranges.items()}
    assert by_range == {"web": 4800, "code": 2400, "wiki": 800}
    # wiki: 60,000 tokens = 3,750 instances of 16... too many for a cap to matter, so use a small one below.
    assert seen["web"].max() == 1 and seen["code"].max() == 1

    small = _three_sources(tmp_path / "small", wiki_tokens=9_000)  # 562 instances; 800 wanted = 1.42x <= 1.5
    ds = _dataset(tmp_path, small, steps=steps, batch=batch, dump="small_run")
    wiki = ds.instances.shares[2]
    order = np.asarray(ds.order.indices(0))
    local = order[ds.instances.source_of(order) == 2] - sum(len(s.instances) for s in ds.instances.shares[:2])
    counts = np.bincount(local, minlength=len(wiki.instances))
    assert len(local) == 800 and counts.max() == 2 and counts.min() == 1  # floor/ceil of 1.42: every one seen
    assert len(local) / len(wiki.instances) <= 1.5


def test_too_small_source_names_what_it_needs_and_has(tmp_path):
    sources = _three_sources(tmp_path, wiki_tokens=4_000)  # 250 instances x 1.5 = 375 < 800
    with pytest.raises(DataError) as e:
        plan_sources(sources, dtype="uint16", seq_len=SEQ, budget=8000)
    msg = str(e.value)
    assert "\n" not in msg
    assert "data.sources[2] (wiki) needs 12,800 tokens" in msg and "has 4,000" in msg and "max_repetition 1.5" in msg


@pytest.mark.parametrize("change,expected", [
    (lambda s: s[0].__setattr__("target_ratio", 0.5), "sum to 0.9"),
    (lambda s: s[1].__setattr__("name", "web"), "used twice"),
    (lambda s: s[1].__setattr__("name", "a/b"), "without '/'"),
    (lambda s: s[2].__setattr__("paths", ["/nowhere/*.npy"]), "matches no file"),
    (lambda s: s[2].__setattr__("max_repetition", 0.0), "max_repetition must be > 0"),
])
def test_source_table_errors(tmp_path, change, expected):
    sources = _three_sources(tmp_path)
    change(sources)
    with pytest.raises(DataError, match=expected):
        plan_sources(sources, dtype="uint16", seq_len=SEQ, budget=800)


def test_order_depends_on_seed_sources_and_budget_only(tmp_path):
    sources = _three_sources(tmp_path)
    a = np.asarray(_dataset(tmp_path, sources, steps=50, dump="a").order.indices(0))
    b = np.asarray(_dataset(tmp_path, sources, steps=50, dump="b").order.indices(0))
    c = np.asarray(_dataset(tmp_path, sources, steps=50, dump="c", seed=1).order.indices(0))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with open(tmp_path / "a" / "global_indices.npy", "rb") as f:
        assert f.read() == a.astype(np.uint32).tobytes()  # raw uint32, OLMo's format
    # Another budget is another order, refused on the same folder (it would change the data of a resumed run).
    with pytest.raises(DataError, match="describes another dataset or seed"):
        _dataset(tmp_path, sources, steps=60, dump="a")


def test_two_ranks_read_exactly_the_one_rank_batches(tmp_path):
    sources = _three_sources(tmp_path)
    one = _take(_dataset(tmp_path, sources, steps=10), 80)
    r0 = _dataset(tmp_path, sources, steps=10, dp_rank=0, dp=2)
    r1 = _dataset(tmp_path, sources, steps=10, dp_rank=1, dp=2)
    a, b = _take(r0, 40), _take(r1, 40)
    two = [x for m in range(10) for x in (*a[4 * m:4 * m + 4], *b[4 * m:4 * m + 4])]
    assert all(np.array_equal(x, y) for x, y in zip(one, two))
    assert r0.take_source_metrics() == r1.take_source_metrics()  # the whole global batch, counted alike


def test_state_resumes_the_order_and_the_token_counts(tmp_path):
    sources = _three_sources(tmp_path)
    ds = _dataset(tmp_path, sources, steps=10)
    full = _take(ds, 80)
    counts = ds.take_source_metrics()
    half = _dataset(tmp_path, sources, steps=10)
    _take(half, 40)
    state = half.state_dict()
    again = _dataset(tmp_path, sources, steps=10)
    again.load_state_dict(state)
    rest = _take(again, 40)
    assert all(np.array_equal(x, y) for x, y in zip(full[40:], rest))
    assert {k: v for k, v in again.take_source_metrics().items() if k.endswith("/tokens")} == \
        {k: v for k, v in counts.items() if k.endswith("/tokens")}


def test_instance_filter_leaves_out_planted_degenerate_instances_only(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 2000, (400, SEQ), dtype=np.uint16)
    planted = [3, 50, 51, 399]
    tokens[3] = 7  # one token repeated
    tokens[50, :] = np.tile([1, 2], SEQ // 2)  # a 2-token pattern 8 times
    tokens[51, 4:] = np.tile([5, 6, 9], 4)  # a 3-token pattern 4 times
    tokens[399] = 11
    os.makedirs(tmp_path / "d")
    tokens.tofile(tmp_path / "d" / "part-0.npy")
    sources = [Source("d", [str(tmp_path / "d" / "part-0.npy")], target_ratio=1.0, max_repetition=1.0)]
    ds = _dataset(tmp_path, sources, steps=49, instance_filter=True, instance_filter_max_period=3,
                  instance_filter_max_count=4)
    order = np.asarray(ds.order.indices(0))
    assert len(ds.instances.shares[0].kept) == 396
    assert not set(planted) & set(order.tolist()) and len(set(order.tolist())) == 392
    # Without the filter they are trained on.
    plain = np.asarray(_dataset(tmp_path, sources, steps=49, dump="plain").order.indices(0))
    assert set(planted) <= set(range(400)) and len(set(plain.tolist())) == 392


def test_flat_memmap_paths_with_the_filter_is_one_source_that_repeats(tmp_path):
    path = _write_source(tmp_path, "flat", 0, 2000, 1600, files=1)  # 100 instances
    data = Data(dataset="memmap", memmap_paths=[path.replace("*", "part-0")], instance_filter=True)
    ds = build_mixture_dataset(data, seq_len=SEQ, local_batch_size=4, global_batch_size=4, seed=0, dp_rank=0,
                               dp_degree=1, dump_folder=str(tmp_path / "run"), budget=300)  # 3 epochs' worth
    order = np.asarray(ds.order.indices(0))
    assert np.array_equal(np.bincount(order, minlength=100), np.full(100, 3))


def test_inspect_batch_shows_each_sequence_source(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sources = _three_sources(tmp_path)
    lines = ["[training]", f"seq_len = {SEQ}", "local_batch_size = 8", "steps = 20"]
    for s in sources:
        lines += ["[[data.sources]]", f'name = "{s.name}"', f'paths = ["{s.paths[0]}"]',
                  f"target_ratio = {s.target_ratio}", f"max_repetition = {s.max_repetition}"]
    (tmp_path / "mix.toml").write_text("\n".join(lines) + "\n")
    ds = _dataset(tmp_path, sources, steps=20, dump="trained")
    expected = np.asarray(ds.order.indices(0))[5 * 8:6 * 8]
    for dump in ("trained", "never_run"):  # the run's order file, or recomputed from (seed, sources, budget)
        p = subprocess.run([sys.executable, os.path.join(root, "scripts", "inspect_batch.py"), "--batch", "5", "--json",
                            "--max-tokens", "0", "--job.config_file", str(tmp_path / "mix.toml"), "--job.dump_folder",
                            str(tmp_path / dump)], capture_output=True, text=True, cwd=root)
        assert p.returncode == 0, p.stderr[-2000:]
        recs = [json.loads(line) for line in p.stdout.splitlines()]
        assert [r["instance"] for r in recs] == expected.tolist()
        ranges = {"web": (0, 600), "code": (600, 1200), "wiki": (1200, 2000)}
        for r in recs:
            lo, hi = ranges[r["source"]]
            assert lo <= min(r["ids"]) and max(r["ids"]) < hi
    assert not os.path.exists(tmp_path / "never_run")  # inspecting writes nothing
