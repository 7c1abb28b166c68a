"""Fake-backend dry runs of the shipped large configs: the real sharding plans build at 8/64/512 ranks on the
meta device, and the printed per-rank parameter bytes are the model's bytes divided by its shards.

The MoE cases check OLMoE's per-rank counts exactly against the arithmetic below (the flavors' shapes and their
parameter counts are in tests/moe_helpers.py, checked in tests/unit/trainer/test_dry_run.py): experts sharded over
ep and efsdp (and replicated over tp), dense weights over dp_shard_cp, and what FSDP all-gathers. Each case runs
./run_train.sh in a subprocess, as users run a dry run."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import pytest

from tests.launch import ROOT, _env
from tests.moe_helpers import OLMOE_1B_7B, OLMOE_232B, Moe

ROW = re.compile(r"^\s*(\d+)\s+([\d,]+)\s+(\d+)\s+([\d,]+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$")
TOTAL = re.compile(r"dry run: \S+ \S+, ([\d,]+) parameters, world (\d+)")
GIB = 1024 ** 3

# config, NGPU, (pp, fsdp, tp)
CASES = {
    "8B": ("llama3_8b.toml", 8, (1, 8, 1)),
    "70B": ("llama3_70b.toml", 64, (1, 8, 8)),
    "405B": ("llama3_405b.toml", 512, (8, 8, 8)),
}


def _dry_run(config: str, ngpu: int, *args: str) -> subprocess.CompletedProcess:
    env = _env({"COMM_MODE": "fake_backend", "NGPU": str(ngpu), "CONFIG": os.path.join("train_configs", config)})
    return subprocess.run(["./run_train.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _table(stdout: str) -> list[dict[str, str]]:
    """The per-rank rows by column name (the header's names are separated by two or more spaces)."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pp rank"))
    names = re.split(r"\s{2,}", lines[i].strip())
    rows = []
    for line in lines[i + 1:]:
        values = line.split()
        if len(values) != len(names) or not values[0].isdigit():
            break
        rows.append(dict(zip(names, values)))
    return rows


def _int(s: str) -> int:
    return int(s.replace(",", ""))


@pytest.mark.parametrize("flavor", list(CASES))
def test_dry_run_prints_sharded_memory(flavor):
    config, ngpu, (pp, fsdp, tp) = CASES[flavor]
    proc = _dry_run(config, ngpu)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    total = TOTAL.search(proc.stdout)
    assert total and int(total.group(2)) == ngpu, proc.stdout
    assert f"mesh: pp {pp} x dp_replicate 1 x dp_shard {fsdp} x cp 1 x tp {tp}" in proc.stdout
    rows = [m.groups() for line in proc.stdout.splitlines() if (m := ROW.match(line))]
    assert [int(r[0]) for r in rows] == list(range(pp)), proc.stdout
    # float32 parameters; every rank holds about 1/(pp x fsdp x tp) of them (norm weights replicate over
    # TP and stages differ by a layer or the embedding, hence the tolerance).
    expected = int(total.group(1).replace(",", "")) * 4 / (pp * fsdp * tp)
    for rank, _, _, _, param_bytes in rows:
        assert abs(int(param_bytes) / expected - 1) < 0.03, f"pp rank {rank}: {param_bytes} bytes vs ~{expected:.0f}"


# The families on the decoder's seams at the world sizes their configs are written for: config, NGPU, the
# flavor's parameter count (tests/unit/models/test_<family>.py ties it to the published one), the mesh line.
FAMILY_CASES = {
    "qwen3-32B": ("qwen3_32b.toml", 64, 32_762_123_264, "pp 1 x dp_replicate 1 x dp_shard 64 x cp 1 x tp 1"),
    "qwen3_moe-235B-A22B": ("qwen3_moe_235b_a22b.toml", 256, 235_093_634_560,
                            "pp 1 x dp_replicate 1 x dp_shard_mod_ep 32 x dp_shard_in_ep 8 x cp 1 x tp 1"),
    "gpt_oss-120B": ("gpt_oss_120b.toml", 64, 116_829_156_672,
                     "pp 1 x dp_replicate 1 x dp_shard_mod_ep 8 x dp_shard_in_ep 8 x cp 1 x tp 1"),
    "deepseek_v3-671B": ("deepseek_v3_671b.toml", 512, 671_026_404_352,
                         "pp 1 x dp_replicate 1 x dp_shard_mod_ep 16 x dp_shard_in_ep 32 x cp 1 x tp 1"),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_dry_runs_shard_every_parameter(case):
    """Every rank holds 1/world of the parameters (experts over ep x efsdp, dense weights over all data ranks),
    and the printed per-rank memory adds up: parameters, gradients and AdamW state in float32."""
    config, ngpu, params, mesh = FAMILY_CASES[case]
    proc = _dry_run(config, ngpu)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    total = TOTAL.search(proc.stdout)
    assert total and _int(total.group(1)) == params and int(total.group(2)) == ngpu, proc.stdout
    assert f"mesh: {mesh}" in proc.stdout
    (row,) = _table(proc.stdout)
    assert abs(_int(row["params"]) * ngpu / params - 1) < 0.01, row
    assert _int(row["param bytes"]) == 4 * _int(row["params"])
    gib = _int(row["param bytes"]) / GIB
    assert float(row["AdamW GiB"]) == pytest.approx(2 * gib, abs=0.01)


def test_dry_run_rejects_an_impossible_pipeline():
    """A schedule constraint fails in preflight, one line naming the fix, before any process group."""
    proc = _dry_run("llama3_405b.toml", 512, "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble")
    assert proc.returncode == 2
    assert "compile.enable = false" in proc.stderr


# ---- Mixture of experts (olmoe): every number by hand -------------------------------------------------------

FP32, BF16 = 4, 2  # stored parameters (and grads, AdamW states); FSDP's gathered compute dtype


@dataclass(frozen=True)
class MoeCase:
    config: str
    model: Moe
    ngpu: int
    args: tuple[str, ...]
    mesh: str
    # Per pipeline rank: (layers, parameter elements, of which experts, gathered elements in bf16), by hand.
    rows: tuple[tuple[int, int, int, int], ...]


M, B = OLMOE_1B_7B, OLMOE_232B
# The dense weights of these layouts divide evenly over dp_shard_cp (no FSDP padding): e.g. 50304 / 64 = 786 rows.
MOE_CASES = {
    # train_configs/olmoe_1b_7b.toml as shipped: FSDP 64 with EP 8, so efsdp = 64 / 8 = 8 and every rank holds
    # 64 / (8 x 8) = 1 expert per layer: 16 x 6,291,456 = 100,663,296 expert elements, plus the dense weights
    # over dp_shard_cp 64: (16 x 16,916,480 + 2 x 103,022,592 + 2,048) / 64 = 7,448,608. Gathered (resharded
    # after forward): the two largest units are the embedding and the output (103,022,592 each); a block is
    # 16,916,480 + its 8 gathered experts x 6,291,456 = 67,248,128.
    "1B-7B/64/ep8": MoeCase(
        "olmoe_1b_7b.toml", M, 64, (),
        "pp 1 x dp_replicate 1 x dp_shard_mod_ep 8 x dp_shard_in_ep 8 x cp 1 x tp 1",
        ((16, 100_663_296 + 7_448_608, 100_663_296, 2 * M.embedding),)),
    # TP 2 composed: dp_shard 32, efsdp 32 / 8 = 4; the experts replicate over tp (each TP rank routes its
    # own sequence shard), so a rank holds 64 / (8 x 4) = 2 per layer: 201,326,592. Dense: attention and the
    # vocab TP-sharded, then FSDP 32: wq, wk, wv, wo 4 x 2048 x 2048 / 64 = 262,144; router 64 x 2048 / 32 =
    # 4,096; q/k_norm 2 x 2048 / 64, attention/ffn_norm 2 x 2048 / 32: 192; embedding and output
    # 2 x 50304 x 2048 / 64 = 3,219,456; final norm 2048 / 32 = 64.
    # Gathered: two blocks now outweigh the embedding (50304 x 1024 after TP): each is its TP shard of the dense
    # weights, 4 x 2048 x 1024 + 131,072 (router) + 2 x 1024 + 2 x 2048 (norms) = 8,525,824, plus its 8 experts
    # gathered over efsdp 4: 8 x 6,291,456.
    "1B-7B/64/ep8-tp2": MoeCase(
        "olmoe_1b_7b.toml", M, 64, ("--parallelism.tensor_parallel_degree", "2"),
        "pp 1 x dp_replicate 1 x dp_shard_mod_ep 4 x dp_shard_in_ep 8 x cp 1 x tp 2",
        ((16, 201_326_592 + 16 * (262_144 + 4_096 + 192) + 3_219_456 + 64, 201_326_592,
          2 * (8_525_824 + 8 * M.expert)),)),
    # 512 ranks as HSDP: 8 replicas of FSDP 64 with EP 64, so efsdp 1: each rank holds its one expert per layer
    # whole, and the same shards as the 64-rank layout above.
    "1B-7B/512/hsdp8-ep64": MoeCase(
        "olmoe_1b_7b.toml", M, 512, ("--parallelism.data_parallel_replicate_degree", "8",
                                     "--parallelism.expert_parallel_degree", "64",
                                     "--training.local_batch_size", "2"),
        "pp 1 x dp_replicate 8 x dp_shard_mod_ep 1 x dp_shard_in_ep 64 x cp 1 x tp 1",
        ((16, 100_663_296 + 7_448_608, 100_663_296, 2 * M.embedding),)),
    # PP 2 composed: 2 x 4 replicas x FSDP 64, EP 8 (efsdp 8): 8 layers per stage, 1 expert each per rank
    # (50,331,648), dense 8 x 16,916,480 / 64 + the embedding (stage 0) or output + norm (stage 1) / 64.
    # Gathered under PP (kept from forward to backward): the whole stage, its 8 x 8 experts per layer gathered
    # over efsdp: 8 x (16,916,480 + 8 x 6,291,456) + 103,022,592 (+ 2,048 on stage 1).
    "1B-7B/512/pp2-ep8": MoeCase(
        "olmoe_1b_7b.toml", M, 512, ("--parallelism.pipeline_parallel_degree", "2",
                                     "--parallelism.data_parallel_replicate_degree", "4"),
        "pp 2 x dp_replicate 4 x dp_shard_mod_ep 8 x dp_shard_in_ep 8 x cp 1 x tp 1",
        ((8, 50_331_648 + 2_114_560 + 1_609_728, 50_331_648, 8 * (M.dense_layer + 8 * M.expert) + M.embedding),
         (8, 50_331_648 + 2_114_560 + 1_609_728 + 32, 50_331_648,
          8 * (M.dense_layer + 8 * M.expert) + M.embedding + M.dim))),
    # The large MoE on 64 ranks: EP 64 = FSDP 64 (efsdp 1), 2 whole experts per layer per rank:
    # 94 x 2 x 18,874,368 = 3,548,381,184; dense (94 x 38,285,824 + 2 x 622,329,856 + 4,096) / 64 = 75,680,176.
    # 14,496,245,440 bytes x 4 (param, grad, 2 AdamW) + gathered embedding and output 2 x 622,329,856 x 2 bytes
    # = 56.32 GiB per rank before activations.
    "232B/64/ep64": MoeCase(
        "olmoe_debug.toml", B, 64, ("--model.flavor", "232B-A19B", "--training.seq_len", "4096",
                                    "--training.local_batch_size", "1", "--parallelism.expert_parallel_degree", "64"),
        "pp 1 x dp_replicate 1 x dp_shard_mod_ep 1 x dp_shard_in_ep 64 x cp 1 x tp 1",
        ((94, 3_548_381_184 + 75_680_176, 3_548_381_184, 2 * B.embedding),)),
    # 512 ranks: PP 8 x FSDP 64 with EP 64 (efsdp 1). 94 layers split 11, 12 x 6, 11; 2 experts per layer whole;
    # dense over 64: 598,216 per layer, embedding 9,723,904 (stage 0), output 9,723,904 + norm 64 (stage 7).
    # Gathered (PP: whole stages): the dense stage + its local experts (not gathered), in bf16.
    "232B/512/pp8-ep64": MoeCase(
        "olmoe_debug.toml", B, 512, ("--model.flavor", "232B-A19B", "--training.seq_len", "4096",
                                     "--training.local_batch_size", "8", "--parallelism.pipeline_parallel_degree",
                                     "8", "--parallelism.expert_parallel_degree", "64"),
        "pp 8 x dp_replicate 1 x dp_shard_mod_ep 1 x dp_shard_in_ep 64 x cp 1 x tp 1",
        ((11, 11 * (2 * B.expert + 598_216) + 9_723_904, 11 * 2 * B.expert,
          11 * (B.dense_layer + 2 * B.expert) + B.embedding),
         *[(12, 12 * (2 * B.expert + 598_216), 12 * 2 * B.expert, 12 * (B.dense_layer + 2 * B.expert))] * 6,
         (11, 11 * (2 * B.expert + 598_216) + 9_723_904 + 64, 11 * 2 * B.expert,
          11 * (B.dense_layer + 2 * B.expert) + B.embedding + B.dim))),
}


def _check_moe(case: MoeCase, proc: subprocess.CompletedProcess) -> list[dict[str, str]]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    total = TOTAL.search(proc.stdout)
    assert total and _int(total.group(1)) == case.model.total and int(total.group(2)) == case.ngpu
    # Under expert parallel the mesh has six dims: dp_shard is dp_shard_mod_ep (efsdp) x dp_shard_in_ep.
    assert f"mesh: {case.mesh}\n" in proc.stdout
    rows = _table(proc.stdout)
    assert [int(r["pp rank"]) for r in rows] == list(range(len(case.rows))), proc.stdout
    for r, (layers, params, experts, gathered) in zip(rows, case.rows):
        got = (int(r["layers"]), _int(r["params"]), _int(r["expert params"]), int(r["param bytes"]))
        assert got == (layers, params, experts, params * FP32), f"pp rank {r['pp rank']}: {r}"
        # grads and AdamW: the same shards, 1x and 2x; gathered in bf16 (GiB to 2 decimals)
        assert float(r["grads GiB"]) == round(params * FP32 / GIB, 2)
        assert float(r["AdamW GiB"]) == round(2 * params * FP32 / GIB, 2)
        assert float(r["gathered GiB"]) == round(gathered * BF16 / GIB, 2), f"pp rank {r['pp rank']}: {r}"
        assert float(r["total GiB"]) == round((4 * params * FP32 + gathered * BF16) / GIB, 2)
    return rows


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_dry_run_counts_experts_by_hand(name):
    case = MOE_CASES[name]
    _check_moe(case, _dry_run(case.config, case.ngpu, *case.args))


def test_moe_dry_run_experts_even_share_when_ep_rank_has_fewer_experts_than_efsdp():
    # FSDP 512 with EP 64: efsdp 8, 64 / 64 = 1 expert per ep rank; the even share is
    # 16 x 64 x 6,291,456 / 512 = 12,582,912 expert elements per rank.
    proc = _dry_run("olmoe_1b_7b.toml", 512, "--parallelism.expert_parallel_degree", "64",
                    "--training.local_batch_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = _table(proc.stdout)
    assert _int(row["expert params"]) == M.layers * M.experts * M.expert // 512


@pytest.mark.parametrize("ngpu,ep,message", [
    # 3 does not divide dp_shard x cp = 64
    (64, "3", "parallelism.expert_parallel_degree = 3 must divide data_parallel_shard x context_parallel = 64x1"),
    # 128 divides 512 ranks but not the 64 experts
    (512, "128", "parallelism.expert_parallel_degree = 128 must divide the 64 experts of olmoe 1B-7B"),
])
def test_moe_dry_run_rejects_a_bad_expert_parallel_degree(ngpu, ep, message):
    """Through run_train.sh: one line on stderr and exit code 2, before any process group."""
    proc = _dry_run("olmoe_1b_7b.toml", ngpu, "--parallelism.expert_parallel_degree", ep,
                    "--training.local_batch_size", "1")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "dry run:" not in proc.stdout

