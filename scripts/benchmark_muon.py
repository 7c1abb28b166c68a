"""Muon against AdamW: optimizer step time and communication, and steps to AdamW's loss (CPU).

    python scripts/benchmark_muon.py step           # optimizer.step() seconds and bytes per rank, 1 and 2 processes
    python scripts/benchmark_muon.py convergence    # debug model: lr sweep of each, steps to AdamW's final loss

`step` times optimizer.step() alone (random gradients, after one warm-up step that creates the state) on the
Llama 3 debug model and on one block of Llama 3.2 1B's shape (dim 2048, FFN 8192, 32 heads, its 128K vocabulary
embedding and output), on one process and under FSDP2 over two (gloo), with each optimizer's extra traffic:
Muon's two all-to-alls per step; AdamW has none (FSDP's own gradient and weight traffic is the same for both
and not counted). `convergence` trains the debug model with each optimizer at each learning rate of the sweep
and reports, against the best AdamW run's loss over its last 10 steps, the first step at which each run's
10-step mean loss reaches it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {"debug": ("llama3", "debugmodel", None), "1b_one_block": ("llama3", "1B", 1)}


def _step_worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config.job_config import Optimizer
    from torchtitan.models import get_train_spec

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, args.threads // world))
    name, flavor, layers = MODELS[args.model]
    spec = get_train_spec(name)
    margs = spec.model_args(flavor)
    if layers:
        margs = dataclasses.replace(margs, n_layers=layers)
    out = {}
    for opt_name in ("AdamW", "Muon"):
        model = spec.build_meta_model(margs)
        if world > 1:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        model.init_weights(buffer_device="cpu", seed=0)
        opt = build_optimizers([model], Optimizer(name=opt_name), "cpu")
        torch.manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # the state exists from here on
        for o in opt.optimizers:
            o.bytes_communicated = 0
        times = []
        for _ in range(args.reps):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        sent = sum(getattr(o, "bytes_communicated", 0) for o in opt.optimizers) / args.reps
        out[opt_name] = {"step_s": statistics.median(times), "sent_mib": sent / 2 ** 20,
                         "params": sum(p.numel() for p in model.parameters())}
        del model, opt
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if world > 1:
        dist.destroy_process_group()


def cmd_step(args) -> None:
    print(f"{'model':14s} {'procs':>5s} {'AdamW s':>8s} {'Muon s':>8s} {'Muon/AdamW':>10s} {'Muon MiB sent/rank':>19s}")
    for model in args.models.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", __file__, "_step",
                   "--model", model, "--reps", str(args.reps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // world))))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{model:14s} {world:5d} FAILED: {(proc.stdout + proc.stderr)[-800:]}")
                continue
            r = json.loads(line[7:])
            a, m = r["AdamW"], r["Muon"]
            print(f"{model:14s} {world:5d} {a['step_s']:8.3f} {m['step_s']:8.3f} {m['step_s'] / a['step_s']:9.1f}x "
                  f"{m['sent_mib']:19.1f}")
    print(f"(median of {args.reps} steps after one warm-up; {args.threads} threads in all; gloo)")


def _train(optimizer: str, lr: float, args) -> list[float]:
    with tempfile.TemporaryDirectory() as dump:
        cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(args.steps),
               "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
               "--lr_scheduler.warmup_steps", str(args.warmup), "--activation_checkpoint.mode", "none",
               "--metrics.log_freq", "1", "--optimizer.name", optimizer, "--optimizer.lr", str(lr)]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NGPU="1"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{optimizer} lr {lr} failed:\n{(proc.stdout + proc.stderr)[-1500:]}")
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _smoothed(losses: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]


def cmd_convergence(args) -> None:
    runs = {(opt, lr): _smoothed(_train(opt, lr, args))
            for opt, lrs in (("AdamW", args.adamw_lrs), ("Muon", args.muon_lrs))
            for lr in (float(x) for x in lrs.split(","))}
    best = min((k for k in runs if k[0] == "AdamW"), key=lambda k: runs[k][-1])
    target = runs[best][-1]
    print(f"target: AdamW lr {best[1]:g}, mean loss of steps {args.steps - 9}..{args.steps} = {target:.4f}")
    print(f"{'optimizer':10s} {'lr':>8s} {'final 10-step loss':>19s} {'steps to target':>16s}")
    for (opt, lr), curve in runs.items():
        reached = next((i + 1 for i, x in enumerate(curve) if i >= 9 and x <= target), None)
        print(f"{opt:10s} {lr:8g} {curve[-1]:19.4f} {reached if reached else 'not reached':>16}")
    print(f"(debug model, seq {args.seq_len} x batch {args.batch}, {args.steps} steps, warm-up {args.warmup}, "
          f"linear decay to 0; one process)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--models", default="debug,1b_one_block")
    s.add_argument("--worlds", default="1,2")
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--threads", type=int, default=2)
    w = sub.add_parser("_step")
    w.add_argument("--model", default="debug")
    w.add_argument("--reps", type=int, default=3)
    w.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("convergence")
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--warmup", type=int, default=20)
    c.add_argument("--adamw-lrs", default="8e-4,1.6e-3,3.2e-3")
    c.add_argument("--muon-lrs", default="8e-4,1.6e-3,3.2e-3")
    args = ap.parse_args()
    {"step": cmd_step, "_step": _step_worker, "convergence": cmd_convergence}[args.cmd](args)


if __name__ == "__main__":
    main()
