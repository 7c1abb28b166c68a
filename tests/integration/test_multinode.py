"""Multi-node launches on one machine: two launches on localhost act as two nodes of one job.

run_train.sh with NNODES/NODE_RANK/MASTER_ADDR (static rendezvous) and NNODES/RDZV_ID/RDZV_ENDPOINT (c10d), and
scripts/multinode_trainer.slurm itself with `srun` and `scontrol` replaced by local stand-ins, must train what one
node with the same number of processes and the same layout trains: the same losses, step by step.
"""
import os
import stat

import pytest

from tests.launch import DEBUG_CONFIG, ROOT, TINY, free_port, losses, run_together, run_train_sh

ARGS = [*TINY, "--training.steps", "4", "--comm.init_timeout_seconds", "120"]
# By world size. 4 ranks: FSDP 2 x TP 2, so each TP group is one node (ranks numbered node by node).
LAYOUTS = {2: [], 4: ["--parallelism.tensor_parallel_degree", "2", "--training.local_batch_size", "2"]}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """losses(world): the per-step losses of one node running `world` processes (each layout trained once)."""
    cache = {}

    def run(world: int) -> dict[int, float]:
        if world not in cache:
            dump = str(tmp_path_factory.mktemp(f"one_node_{world}") / "run")
            proc = run_train_sh(world, dump, [*ARGS, *LAYOUTS[world]])
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            cache[world] = losses(dump)
            assert sorted(cache[world]) == [1, 2, 3, 4]
        return cache[world]
    return run


def _check_nodes(procs, world: int) -> str:
    """Every launch ended well and saw the whole world (one job, not two); the tail of each launch's output."""
    out = "\n".join(f"--- launch {k} (exit {p.returncode}):\n{p.stdout[-4000:]}" for k, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), out
    assert all(f"world {world}: " in p.stdout for p in procs), out
    return out


@pytest.mark.parametrize("per_node,rendezvous", [(1, "static"), (2, "c10d")])
def test_two_nodes_train_like_one(tmp_path, one_node, per_node, rendezvous):
    """2 x 1 (FSDP over 2) with NODE_RANK + MASTER_ADDR, 2 x 2 (FSDP 2 x TP 2) with RDZV_ID + RDZV_ENDPOINT."""
    world, port, dump = 2 * per_node, free_port(), str(tmp_path / "run")
    if rendezvous == "static":
        envs = [{"NODE_RANK": str(k), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for k in (0, 1)]
    else:
        envs = [{"RDZV_ID": "two-nodes", "RDZV_ENDPOINT": f"localhost:{port}"}] * 2
    envs = [{**e, "NNODES": "2", "NGPU": str(per_node)} for e in envs]
    procs = run_together(["./run_train.sh", "--job.dump_folder", dump, *ARGS, *LAYOUTS[world]], envs)
    out = _check_nodes(procs, world)
    # Each node prints its local rank 0, labelled with its global rank.
    first_ranks = [f"[rank{k * per_node}]:" for k in (0, 1)]
    printed = [next((r for r in first_ranks if r in p.stdout), None) for p in procs]
    if rendezvous == "c10d":
        printed.sort(key=str)  # the rendezvous picks which node holds ranks 0..per_node-1
    assert printed == first_ranks, out
    assert losses(dump) == one_node(world)


SRUN = """#!/usr/bin/env bash
# Stand-in for srun: the command once per node of SLURM_JOB_NODELIST (comma-separated), all on this machine,
# or once with --ntasks=1. --kill-on-bad-exit: the first failure stops the others.
IFS=, read -ra nodes <<< "$SLURM_JOB_NODELIST"
n=${#nodes[@]}
while [[ $1 == -* ]]; do
  case $1 in --ntasks=1) n=1 ;; -w) shift ;; esac
  shift
done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for _ in "${pids[@]}"; do
  wait -n && continue
  status=$?
  if (( rc == 0 )); then rc=$status; kill "${pids[@]}" 2>/dev/null; fi
done
exit $rc
"""

SCONTROL = """#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames LIST`: one line per comma-separated name.
[ "$1 $2" = "show hostnames" ] || { echo "stand-in scontrol knows only 'show hostnames'" >&2; exit 1; }
tr , '\\n' <<< "$3"
"""


def test_slurm_script_trains_like_one_node(tmp_path, one_node):
    """scripts/multinode_trainer.slurm as sbatch runs it on 2 nodes x 1 GPU, its srun launching both here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    dump = str(tmp_path / "run")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0,node1",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": ROOT, "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port()),
           "CONFIG_FILE": DEBUG_CONFIG}
    procs = run_together(["bash", "scripts/multinode_trainer.slurm", "--job.dump_folder", dump, *ARGS], [env])
    tail = _check_nodes(procs, 2)
    out = procs[0].stdout
    assert "nodes: 2 x 1 GPUs, rendezvous at " in out, tail
    # Both nodes printed (their local rank 0: global ranks 0 and 1), each the whole world.
    assert out.count("world 2: ") == 2 and out.count("training finished") == 2, tail
    assert losses(dump) == one_node(2)


@pytest.mark.parametrize("env,fragment", [
    ({"NNODES": "0"}, "NNODES=0: the number of nodes must be a positive integer"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be a node number below NNODES=2"),
    ({"NODE_RANK": "1"}, "NODE_RANK=1 must be a node number below NNODES=1 (0..0); set NNODES on every node"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs the first node's address: RDZV_ENDPOINT=host:port or"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "h"}, "rendezvous endpoint 'h' must be host:port"),
    ({"NNODES": "2", "MASTER_ADDR": "h"}, "NNODES=2 needs NODE_RANK=0..1 (this node's number) or RDZV_ID"),
    ({"NNODES": "2", "MASTER_ADDR": "h", "NODE_RANK": "0", "RDZV_ID": "j"}, "set NODE_RANK (static rendezvous) or"),
    # The config is checked against the whole world, NNODES x NGPU = 4 ranks, before any rendezvous.
    ({"NNODES": "2", "NGPU": "2", "NODE_RANK": "1", "MASTER_ADDR": "h",
      "ARGS": "--parallelism.tensor_parallel_degree 3"}, "world size 4 is not divisible by"),
])
def test_bad_multinode_settings_are_one_line(tmp_path, env, fragment):
    env = dict(env)
    args = env.pop("ARGS", "").split()
    proc = run_train_sh(int(env.pop("NGPU", "1")), str(tmp_path / "bad"), args, extra_env=env, timeout=120)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not os.path.exists(tmp_path / "bad")
