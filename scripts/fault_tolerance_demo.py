"""Fault tolerance on one machine: a torchft lighthouse and N replica groups, optionally one killed and restarted.

    python scripts/fault_tolerance_demo.py --replicas 2 --nproc 1 --kill 1:10 -- --training.steps 150

starts `torchft_lighthouse` on a free port, then `REPLICA_ID=i NUM_REPLICAS=N NGPU=nproc ./run_train.sh ...` for
each group (the commands docs/fault_tolerance.md gives for separate machines). With --kill R:S, replica group R is
killed with SIGKILL (the launcher and its workers) once it has committed step S, and started again after
--restart-after seconds with the same command; it rejoins from a live group. Each group logs to
{dump_folder}/replica_{i}.log (the restarted one to replica_{i}.restart.log); per-step records (quorum, global sample
indices, optional weight digests) are in {dump_folder}/replica_{i}/steps_rank{r}.jsonl. Exit code: 0 when every
group (the restarted one included) finished.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lighthouse_binary() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
    found = path if os.path.exists(path) else shutil.which("torchft_lighthouse")
    if not found:
        sys.exit("torchft_lighthouse not found: install the ft extra (pip install -e '.[ft]')")
    return found


def last_step(dump_folder: str, replica: int) -> int:
    path = os.path.join(dump_folder, f"replica_{replica}", "steps_rank0.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


def start_group(replica: int, args, lighthouse: str, log_name: str) -> subprocess.Popen:
    env = dict(os.environ, REPLICA_ID=str(replica), NUM_REPLICAS=str(args.replicas), NGPU=str(args.nproc),
               TORCHFT_LIGHTHOUSE=lighthouse, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    out = open(os.path.join(args.dump_folder, log_name), "w")
    return subprocess.Popen([os.path.join(ROOT, "run_train.sh"), "--job.dump_folder", args.dump_folder,
                             *args.train_args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and all its workers at once, as a machine failure would."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="replica groups")
    p.add_argument("--nproc", type=int, default=1, help="processes per replica group (FSDP inside it)")
    p.add_argument("--dump-folder", default="./outputs/ft_demo")
    p.add_argument("--kill", default="", help="R:S: kill replica group R after it committed step S, then restart it")
    p.add_argument("--restart-after", type=float, default=1.0, help="seconds between the kill and the restart")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before everything is stopped")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=1000,
                   help="the lighthouse drops a group silent for this long")
    p.add_argument("--join-timeout-ms", type=int, default=1000,
                   help="the lighthouse waits this long for live groups to join a quorum; with DiLoCo, more than a "
                        "sync interval, so a restarted group waits for the live ones' next sync")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="start replica group r after r x this many seconds (a job whose groups come up apart)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then trainer options for every group")
    args = p.parse_args()
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    os.makedirs(args.dump_folder, exist_ok=True)
    port = free_port()
    lighthouse = subprocess.Popen(
        [lighthouse_binary(), "--min_replicas", "1", "--bind", f"[::]:{port}", "--quorum_tick_ms", "50",
         "--join_timeout_ms", str(args.join_timeout_ms), "--heartbeat_timeout_ms", str(args.heartbeat_timeout_ms)],
        stdout=open(os.path.join(args.dump_folder, "lighthouse.log"), "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    address = f"http://localhost:{port}"
    print(f"lighthouse {address}; {args.replicas} replica groups of {args.nproc} process(es); logs in "
          f"{args.dump_folder}", flush=True)
    groups = {}
    for r in range(args.replicas):
        if r and args.stagger:
            time.sleep(args.stagger)
        groups[r] = start_group(r, args, address, f"replica_{r}.log")
    victim, kill_step = (int(x) for x in args.kill.split(":")) if args.kill else (None, None)
    restarted = False
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline and any(g.poll() is None for g in groups.values()):
            if victim is not None and not restarted and last_step(args.dump_folder, victim) >= kill_step:
                kill_group(groups[victim])
                print(f"killed replica group {victim} (SIGKILL) after step {last_step(args.dump_folder, victim)}",
                      flush=True)
                time.sleep(args.restart_after)
                groups[victim] = start_group(victim, args, address, f"replica_{victim}.restart.log")
                print(f"restarted replica group {victim}", flush=True)
                restarted = True
            time.sleep(0.1)
    finally:
        for g in groups.values():
            if g.poll() is None:
                kill_group(g)
        kill_group(lighthouse)
    codes = {r: g.returncode for r, g in groups.items()}
    print(f"exit codes by replica group: {codes}", flush=True)
    return 0 if all(c == 0 for c in codes.values()) and (victim is None or restarted) else 1


if __name__ == "__main__":
    sys.exit(main())
