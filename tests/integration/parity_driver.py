"""Train several layouts in one process group and write each one's per-step loss and grad norm.

Launched once per world size by test_parallel_parity.py (torchrun pays its ~7-12 s
start-up once, not once per layout):

    torchrun --nproc_per_node N tests/integration/parity_driver.py SPEC.json OUT.json

SPEC.json: {"common": [cli args], "layouts": {name: [cli args]}}. Every layout
calls `torchtitan.train.train` with the common args plus its own, in order.
OUT.json (written by rank 0): {name: {"loss": [...], "grad_norm": [...], "validation_loss": [...], "seconds": s}},
plus "downstream": [per evaluation {task: metrics}] when the layout evaluates.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _nested(record: dict) -> dict:
    out: dict = {}
    for key, value in record.items():
        if key.startswith("downstream/"):
            _, task, name = key.split("/", 2)
            out.setdefault(task, {})[name] = value
    return out


def main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from torchtitan.config import load_config
    from torchtitan.tools.logging import init_logging
    from torchtitan.train import train
    from torchtitan.trainer.plan import make_plan

    init_logging()
    with open(spec_path) as f:
        spec = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results: dict = {}
    try:
        for name, args in spec["layouts"].items():
            cfg = load_config([*spec["common"], "--job.dump_folder", os.path.join(spec["dump_root"], name), *args],
                              env={})
            make_plan(cfg, world)
            t0 = time.perf_counter()
            records = train(cfg)
            train_records = [r for r in records if "loss" in r]
            results[name] = {"loss": [r["loss"] for r in train_records],
                             "grad_norm": [r["grad_norm"] for r in train_records],
                             "validation_loss": [r["validation_loss"] for r in records if "validation_loss" in r],
                             "seconds": time.perf_counter() - t0}
            evaluations = [r for r in records if "downstream_seconds" in r]
            if evaluations:  # downstream/<task>/<key> -> {task: {key: value}}
                results[name]["downstream"] = [_nested(r) for r in evaluations]
            for key in ("load_balance_loss", "router_z_loss"):  # MoE models
                if any(key in r for r in train_records):
                    results[name][key] = [r[key] for r in train_records]
            if int(os.environ.get("RANK", "0")) == 0:
                # Written after every layout, so a later failure still leaves the earlier results to read.
                with open(out_path, "w") as f:
                    json.dump(results, f, indent=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
