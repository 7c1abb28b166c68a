"""Launch the real trainer in subprocesses (torchrun on gloo) and read back its metrics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(ROOT, "train_configs", "debug_model.toml")

# Small and fast: every layout in the parity tests uses these unless told otherwise.
TINY = ["--training.seq_len", "64", "--training.local_batch_size", "4", "--metrics.log_freq", "1",
        "--lr_scheduler.warmup_steps", "2", "--training.steps", "5", "--activation_checkpoint.mode", "none"]


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TORCHTITAN_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def run_train(dump_folder: str, args: list[str], nproc: int = 1, timeout: int = 300, config: str = DEBUG_CONFIG,
              env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """torchrun -m torchtitan.train with a config and overrides; dump_folder is forced.

    One process is started without torchrun, with the environment torchrun would give it (a world of one on a
    free port): torchrun's agent adds ~3.5 s per launch here, and the multi-process tests and run_train_sh
    exercise it."""
    train = ["-m", "torchtitan.train", "--job.config_file", config, "--job.dump_folder", dump_folder,
             "--comm.init_timeout_seconds", "120", *args]
    if nproc == 1:
        cmd = [sys.executable, *train]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend",
               "c10d", "--rdzv_endpoint", "localhost:0", *train]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_train_sh(ngpu: int, dump_folder: str, args: list[str], extra_env: dict | None = None,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    """./run_train.sh as users run it, with NGPU processes; dump_folder is forced."""
    env = _env({"NGPU": str(ngpu), **(extra_env or {})})
    return subprocess.run(["./run_train.sh", "--job.dump_folder", dump_folder, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(cmd: list[str], envs: list[dict], timeout: int = 300,
                 grace: float = 30.0) -> list[subprocess.CompletedProcess]:
    """Run cmd once per env, all at once, from the repo root: the nodes of one job on this machine.

    A node whose peer failed would wait out its rendezvous, so `grace` seconds after the first failure (or at
    the timeout) every launch still running is killed with its workers; its returncode is then negative."""
    procs, outs = [], []
    for extra in envs:
        out = tempfile.TemporaryFile("w+")  # files, not pipes: nobody reads a pipe while the others run
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(extra), stdout=out, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
        outs.append(out)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode for p in procs):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.2)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its session: the agent and the workers it started
            except ProcessLookupError:
                pass
            p.wait()
    results = []
    for p, out in zip(procs, outs):
        out.seek(0)
        results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), ""))
        out.close()
    return results


PARITY_DRIVER = os.path.join(ROOT, "tests", "integration", "parity_driver.py")


def run_parity_driver(world: int, spec: dict, spec_path: str, out_path: str,
                      timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """Train several layouts in one launch of `world` processes (tests/integration/parity_driver.py).

    spec: {"common": [...], "layouts": {name: [...]}, "dump_root": ...}. Returns the process and the
    {layout: {"loss": [...], "grad_norm": [...]}} results written so far (those that finished).
    """
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if world == 1:
        cmd = [sys.executable, PARITY_DRIVER, spec_path, out_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", "localhost:0", PARITY_DRIVER, spec_path, out_path]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(None), capture_output=True, text=True, timeout=timeout)
    results = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            results = json.load(f)
    return proc, results


def run_parity_world(tmp: str, world: int, common: list[str], layouts: dict[str, list[str]]) -> tuple[dict, list]:
    """run_parity_driver for one world size under tmp: (results of the layouts that finished, [an error line
    naming the world and the layouts it did not reach, with the output's tail] when the launch failed)."""
    spec = {"common": common, "dump_root": os.path.join(tmp, f"runs{world}"), "layouts": layouts}
    proc, out = run_parity_driver(world, spec, os.path.join(tmp, f"spec{world}.json"),
                                  os.path.join(tmp, f"out{world}.json"))
    if proc.returncode == 0:
        return out, []
    missing = sorted(set(layouts) - set(out))
    return out, [f"world {world} failed ({proc.returncode}) before {missing}:\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-5000:]}"]


def run_python(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(dump_folder: str) -> list[dict]:
    path = os.path.join(dump_folder, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(dump_folder: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(dump_folder)}


def make_seed_checkpoint(dump_folder: str, extra: list[str] | None = None) -> str:
    """A step-0 seed in dump_folder/checkpoint; returns the step-0 path."""
    run_train(dump_folder, ["--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint",
                            "--training.seq_len", "64", *(extra or [])], nproc=1)
    return os.path.join(dump_folder, "checkpoint", "step-0")
