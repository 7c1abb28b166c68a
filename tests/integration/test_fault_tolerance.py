"""Fault tolerance with torchft, real processes: a lighthouse, two replica groups, one killed with SIGKILL mid-run.

scripts/fault_tolerance_demo.py starts the lighthouse and the groups (run_train.sh with REPLICA_ID/NUM_REPLICAS),
kills group 1 once it committed step KILL_AT and restarts it. From the per-step records each rank writes
(replica_{i}/steps_rank{r}.jsonl: quorum, global sample indices, weight digest) the tests check: the survivor
committed every step once; the restarted group rejoined from the live one (no checkpoint read) and from then on
holds bitwise the same weights; both reached the last step; every step's samples are the next ones of the global
order, none lost or repeated across the failure; the checkpoints load in runs without fault tolerance.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.launch import TINY, losses, read_metrics, run_python, run_train

pytest.importorskip("torchft")

pytestmark = pytest.mark.slow

DEMO = os.path.join("scripts", "fault_tolerance_demo.py")
KILL_AT = 6
LOCAL_BATCH = 2


def _args(steps: int, extra: list[str] = ()) -> list[str]:
    args = list(TINY)
    for key, value in (("--training.steps", str(steps)), ("--training.local_batch_size", str(LOCAL_BATCH))):
        args[args.index(key) + 1] = value
    return [*args, "--fault_tolerance.log_weight_digest", *extra]


def _records(dump: str, replica: int, nproc: int) -> list[dict]:
    out = []
    for rank in range(nproc):
        with open(os.path.join(dump, f"replica_{replica}", f"steps_rank{rank}.jsonl")) as f:
            out += [dict(json.loads(line), grank=rank) for line in f if line.strip()]
    return out


def _run_kill_scenario(dump: str, nproc: int, steps: int, extra: list[str] = ()) -> dict:
    proc = run_python([DEMO, "--replicas", "2", "--nproc", str(nproc), "--dump-folder", dump, "--kill", f"1:{KILL_AT}",
                       "--restart-after", "0.5", "--timeout", "240", "--", *_args(steps, extra)], timeout=300)
    logs = {name: open(os.path.join(dump, name)).read()[-3000:] for name in sorted(os.listdir(dump))
            if name.endswith(".log")}
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}\n" + "\n".join(
        f"--- {k}\n{v}" for k, v in logs.items())
    assert "killed replica group 1" in proc.stdout

    survivor, restarted = _records(dump, 0, nproc), _records(dump, 1, nproc)
    # The survivor committed every step exactly once, on every rank, and logged each one (a starting job's first
    # step commits only with every group, so neither group trains alone before the other arrives).
    for rank in range(nproc):
        assert sorted(r["step"] for r in survivor if r["grank"] == rank) == list(range(1, steps + 1))
    logged = read_metrics(os.path.join(dump, "replica_0"))
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    by_step = {r["step"]: r["replicas"] for r in logged}
    assert min(by_step.values()) == 1 and by_step[steps] == 2, by_step  # alone for a while, then both again

    # The restarted group rejoined (healed from the live one: it never trained steps 1..rejoin-1 again).
    # The kill lands once group 1 committed KILL_AT; it may commit a step or two more before SIGKILL arrives.
    seen = sorted({r["step"] for r in restarted})
    before_kill = max(s for i, s in enumerate(seen) if s == i + 1)  # the first run's steps: 1..before_kill
    assert before_kill >= KILL_AT, seen
    after_kill = [s for s in seen if s > before_kill]
    assert after_kill and after_kill[-1] == steps, "the restarted group did not reach the last step"
    rejoin = after_kill[0]
    assert after_kill == list(range(rejoin, steps + 1))
    assert by_step[rejoin - 1] == 1 and all(by_step[s] == 2 for s in range(rejoin, steps + 1))
    restart_log = open(os.path.join(dump, "replica_1.restart.log")).read()
    assert "healing is required" in restart_log and "loading checkpoint" not in restart_log

    # From the rejoin on, both groups hold bitwise the same weights (digest of each rank's shards per step).
    digests = {(r["step"], r["grank"], r["replica"]): r["weights"] for r in survivor + restarted}
    for step in range(rejoin, steps + 1):
        for rank in range(nproc):
            assert digests[(step, rank, 0)] == digests[(step, rank, 1)], f"weights differ at step {step} rank {rank}"

    # Every step trained on the next samples of the global order: none lost, none repeated. The killed group may
    # have committed one step more than it recorded (SIGKILL between its commit and its record): at that step
    # only its record may be missing, and the survivor's samples are still the step's next ones.
    per_group = LOCAL_BATCH * nproc
    killed_at = 1 + max(r["step"] for r in restarted if r["step"] < rejoin)
    position = 0
    for step in range(1, steps + 1):
        recs = [r for r in survivor + restarted if r["step"] == step]
        present = {r["present"] for r in recs}
        assert len(present) == 1, (step, recs)
        present = present.pop()
        keys = [(r["replica"], r["grank"]) for r in recs]
        samples = sorted(i for r in recs for i in r["samples"])
        window = list(range(position, position + present * per_group))
        if step == killed_at and len(keys) < present * nproc:
            assert {k[0] for k in keys} == {0} and len(keys) == len(set(keys)) == nproc, (step, recs)
            assert set(samples) < set(window) and len(samples) == len(set(samples)) == per_group, (step, samples)
        else:
            assert len(keys) == len(set(keys)) == present * nproc, (step, recs)
            assert samples == window, (step, samples, position)
        position += present * per_group
    return {"rejoin": rejoin, "steps": steps}


def test_kill_and_rejoin_one_process_groups(tmp_path):
    dump = str(tmp_path / "ft")
    steps = 110  # a restart takes ~8 s, ~60 steps of this tiny model: the rejoined group trains the last ~40
    _run_kill_scenario(dump, nproc=1, steps=steps,
                       extra=["--checkpoint.enable", "--checkpoint.interval", "40"])
    ckpt = os.path.join(dump, "checkpoint")
    assert sorted(os.listdir(ckpt)) == [f"step-{steps}", "step-40", "step-80"]

    # The final (weights-only) checkpoint starts a run without fault tolerance: its first loss is the trained one.
    fresh = str(tmp_path / "fresh")
    run_train(fresh, [*TINY, "--checkpoint.enable", "--checkpoint.initial_load_path",
                      os.path.join(ckpt, f"step-{steps}"), "--training.steps", "1"])
    trained = losses(os.path.join(dump, "replica_0"))
    assert losses(fresh)[1] < trained[1] - 1.0, (losses(fresh), trained[1])

    # A full checkpoint written with fault tolerance resumes without it (model, optimizer, schedule, data position).
    resume = str(tmp_path / "resume")
    os.makedirs(os.path.join(resume, "checkpoint"))
    shutil.copytree(os.path.join(ckpt, "step-80"), os.path.join(resume, "checkpoint", "step-80"))
    no_ft = [a for a in _args(82) if a != "--fault_tolerance.log_weight_digest"]
    proc = run_train(resume, [*no_ft, "--checkpoint.enable", "--checkpoint.interval", "1000"])
    assert "loading checkpoint" in proc.stdout + proc.stderr
    assert set(losses(resume)) == {81, 82}


def test_kill_and_rejoin_fsdp_groups(tmp_path):
    """Two processes per replica group, FSDP inside each: rank r of each group reduces with rank r of the other.
    The optimizer is Muon: its Newton-Schulz gathers each matrix inside a group (the owner round-robin over that
    group's two ranks) after torchft averaged the gradients across groups, and healing hands the rejoining group
    Muon's momentum as well (else the weights would part again at the next step)."""
    dump = str(tmp_path / "ft")
    steps = 70  # 4 trainer processes on the test machine's 2 cores: ~0.4 s a step, ~12 s to restart
    _run_kill_scenario(dump, nproc=2, steps=steps, extra=["--checkpoint.enable", "--checkpoint.interval", "1000",
                                                          "--optimizer.name", "Muon"])
    assert "optimizer: Muon on matrix" in open(os.path.join(dump, "replica_0.log")).read()
    fresh = str(tmp_path / "fresh")
    run_train(fresh, [*TINY, "--checkpoint.enable", "--checkpoint.initial_load_path",
                      os.path.join(dump, "checkpoint", f"step-{steps}"), "--training.steps", "1"], nproc=2)
    assert losses(fresh)[1] < losses(os.path.join(dump, "replica_0"))[1] - 1.0


SYNC_STEPS = 5


def _diloco_intervals(records: list[dict]) -> list[dict]:
    """One group's syncs, in file order, each with the inner steps since the one before (that group's training)."""
    out, inner = [], []
    for r in records:
        if "block" in r:
            inner.append(r)
        if r.get("sync"):
            out.append(dict(r, inner=inner))
            inner = []
    return out


def test_kill_and_rejoin_diloco(tmp_path):
    """DiLoCo (semi-synchronous): each group trains SYNC_STEPS steps on its own block of the global order, then
    the groups average pseudo-gradients. Group 1 dies mid-interval: its block goes back to the queue and the
    survivor trains it; the restarted group waits for the survivor's next sync, is healed there and syncs with it.
    Group 1 starts 4 s after group 0 (more than the lighthouse's join timeout): the job's first sync still waits
    for both, so neither trains the first block alone."""
    dump = str(tmp_path / "ft")
    steps, h = 100, SYNC_STEPS
    proc = run_python([DEMO, "--replicas", "2", "--nproc", "1", "--dump-folder", dump, "--kill", f"1:{KILL_AT}",
                       "--restart-after", "0.5", "--timeout", "200", "--join-timeout-ms", "3000", "--stagger", "4",
                       "--",
                       *_args(steps, ["--fault_tolerance.semi_sync_method", "diloco",
                                      "--fault_tolerance.sync_steps", str(h),
                                      "--checkpoint.enable", "--checkpoint.interval", "50"])], timeout=240)
    logs = {name: open(os.path.join(dump, name)).read()[-3000:] for name in sorted(os.listdir(dump))
            if name.endswith(".log")}
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}\n" + "\n".join(
        f"--- {k}\n{v}" for k, v in logs.items())
    assert "killed replica group 1" in proc.stdout
    survivor, restarted = _records(dump, 0, 1), _records(dump, 1, 1)

    # The survivor trained every step once from its first (a group started late joins at the other's first sync)
    # and logged each; every one of its syncs committed.
    inner0 = [r["step"] for r in survivor if "block" in r]
    first = inner0[0]
    assert first <= h + 1 and inner0 == list(range(first, steps + 1)), inner0
    first_syncs = [r for r in survivor + restarted if r.get("sync") and r["committed"] and r["step"] == 0]
    assert [r["sync_present"] for r in first_syncs] == [2, 2], first_syncs  # the job started with both groups
    assert [r["step"] for r in read_metrics(os.path.join(dump, "replica_0"))] == list(range(first, steps + 1))
    syncs0 = {r["step"]: r for r in survivor if r.get("sync")}
    assert all(r["committed"] for r in syncs0.values())
    assert sorted(s for s in syncs0 if s >= first) == list(range(-(-first // h) * h, steps + 1, h))

    # The restarted group joined at a sync of the survivor's, healed there (no checkpoint read), then trained every
    # step to the last; at that sync and every one after, both groups hold bitwise the same weights.
    rejoin_rec = [r for r in restarted if r.get("sync") and r["healed"] and r["step"] > KILL_AT]
    assert len(rejoin_rec) == 1, restarted
    rejoin = rejoin_rec[0]["step"]
    assert rejoin % h == 0 and rejoin < steps
    inner1 = [r["step"] for r in restarted if "block" in r and r["step"] > rejoin]
    assert inner1 == list(range(rejoin + 1, steps + 1))
    restart_log = open(os.path.join(dump, "replica_1.restart.log")).read()
    assert "healing is required" in restart_log and "loading checkpoint" not in restart_log
    syncs1 = {r["step"]: r for r in restarted if r.get("sync") and r["step"] >= rejoin}
    assert sorted(syncs1) == list(range(rejoin, steps + 1, h))
    for s in range(rejoin, steps + 1, h):
        assert syncs0[s]["weights"] == syncs1[s]["weights"], f"weights differ after the sync at step {s}"
        assert syncs0[s]["blocks"] == syncs1[s]["blocks"] and syncs0[s]["sync_present"] == 2
    assert min(r["sync_present"] for r in syncs0.values()) == 1  # the survivor synced alone for a while

    # Samples: each committed sync took the blocks of the groups that trained in its interval; a group's interval
    # is H steps on one block, the block's samples in order. Every block up to the last is committed exactly once
    # (the killed group's unfinished one was queued again and trained by the survivor), none is left over.
    block_size = h * LOCAL_BATCH
    committed = []
    for recs in (survivor, restarted):
        for sync in _diloco_intervals(recs):
            if not sync["committed"] or sync["healed"] or sync.get("block") not in sync["blocks"]:
                continue
            b = sync["block"]
            assert [r["step"] for r in sync["inner"]] == list(range(sync["step"] - h + 1, sync["step"] + 1))
            assert all(r["block"] == b for r in sync["inner"])
            samples = [i for r in sync["inner"] for i in r["samples"]]
            assert samples == list(range(b * block_size, (b + 1) * block_size)), (sync["step"], b, samples)
            committed.append(b)
    from_syncs = sorted(b for r in syncs0.values() for b in r["blocks"])
    assert sorted(committed) == from_syncs == list(range(len(committed))), (committed, from_syncs)
    assert any(r["pending"] for r in syncs0.values()), "the killed group's block was not queued again"
    assert syncs0[steps]["pending"] == []

    # The final (weights-only) checkpoint is the last sync's weights and loads in a run without fault tolerance.
    ckpt = os.path.join(dump, "checkpoint")
    assert sorted(os.listdir(ckpt)) == [f"step-{steps}", "step-50"]
    fresh = str(tmp_path / "fresh")
    run_train(fresh, [*TINY, "--checkpoint.enable", "--checkpoint.initial_load_path",
                      os.path.join(ckpt, f"step-{steps}"), "--training.steps", "1"])
    # The loss of the untrained model: step 1 of whichever group trained it (one of them started first).
    untrained = [losses(os.path.join(dump, f"replica_{g}")).get(1) for g in (0, 1)]
    assert losses(fresh)[1] < min(v for v in untrained if v is not None) - 0.5, (losses(fresh), untrained)
