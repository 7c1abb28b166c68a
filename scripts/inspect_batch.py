"""Print the token ids and text of global batch N of a memmap run, from its config and data order.

    python scripts/inspect_batch.py --batch 0 --job.config_file train_configs/olmo2_7b.toml \\
        --job.dump_folder outputs/olmo2_7b [--world-size 64] [--max-tokens 64]

Global batch N is what optimizer step N + 1 trains on: instances
order[N*G : (N+1)*G] of the epoch's permutation, G = training.global_batch_size
(see torchtitan/datasets/memmap.py). It does not depend on the number of
ranks; --world-size only matters when global_batch_size is -1 (then G =
local_batch_size x dp) and to show which dp rank and micro-batch got each
sequence. The order is read from {dump_folder}/global_indices*.npy; if the run
has not written it yet, it is computed from (seed, epoch, dataset size), which
gives the same permutation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _Order:
    """DataOrder's read side without writing anything: the run's files when they match, else recomputed."""

    def __init__(self, folder: str, meta: dict, build=None):
        from torchtitan.datasets.memmap import ORDER_META, build_global_indices

        self.folder, self.meta = folder, meta
        self.build = build or (lambda epoch: build_global_indices(self.num_instances, self.seed, epoch))
        self.num_instances, self.seed = meta["num_instances"], meta["seed"]
        path = os.path.join(folder, ORDER_META)
        saved = json.load(open(path)) if os.path.isfile(path) else None
        self.from_files = saved == meta
        if saved is not None and not self.from_files:
            print(f"warning: {path} describes another dataset or seed; showing the order of the current config",
                  file=sys.stderr)

    def indices(self, epoch: int) -> np.ndarray:
        from torchtitan.datasets.memmap import indices_filename

        path = os.path.join(self.folder, indices_filename(epoch))
        if self.from_files and os.path.isfile(path):
            return np.memmap(path, dtype=np.uint32, mode="r")
        return self.build(epoch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--batch", type=int, required=True, help="global batch index N (0-based; step N + 1)")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the run (for dp and global_batch_size = -1)")
    p.add_argument("--max-tokens", type=int, default=32, help="token ids / text shown per sequence (0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per sequence instead")
    args, rest = p.parse_known_args(argv)

    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.config import load_config
    from torchtitan.config.batch import BatchPlan
    from torchtitan.datasets.memmap import MemmapInstances, global_batch_instances, order_meta
    from torchtitan.datasets.mixture import mixture_plan
    from torchtitan.distributed.parallel_dims import ParallelDims

    cfg = load_config(rest)
    t, d = cfg.training, cfg.data
    if d.dataset != "memmap":
        raise SystemExit(f"error: data.dataset is {d.dataset!r}; inspect_batch reads memmap runs only")
    try:
        dp = ParallelDims.from_config(cfg.parallelism, args.world_size).dp
        batch = BatchPlan.build(local_batch_size=t.local_batch_size, global_batch_size=t.global_batch_size,
                                seq_len=t.seq_len, dp=dp)
    except ValueError as e:
        raise SystemExit(f"error: {e}; pass --world-size with the run's number of ranks") from None
    micro, global_batch = t.local_batch_size * dp, batch.group_batch_size
    seed = t.seed if t.seed is not None else 0
    if d.sources or d.instance_filter:  # a mixture: its order depends on the run's budget too
        mix, meta, build = mixture_plan(d, seq_len=t.seq_len, seed=seed, budget=t.steps * batch.global_batch_size)
        instances, order = mix, _Order(cfg.job.dump_folder, meta, build)
    else:
        instances = MemmapInstances(list(d.memmap_paths), d.memmap_dtype, t.seq_len,
                                    list(d.memmap_label_mask_paths) or None)
        order = _Order(cfg.job.dump_folder, order_meta(instances, seed))
    epoch, ids = global_batch_instances(order, global_batch, args.batch)
    tokenizer = build_tokenizer(cfg.model.tokenizer_path or os.path.join(ROOT, "torchtitan", "assets", "tokenizer"),
                                cfg.model.tokenizer_backend)
    source = "the run's data order file" if order.from_files else "recomputed from (seed, epoch, dataset size)"
    if not args.json:
        print(f"global batch {args.batch} (optimizer step {args.batch + 1}), epoch {epoch}: {len(ids)} sequences of "
              f"{t.seq_len} tokens, order {source}; dp = {dp}, micro-batch = {micro}")
    k = args.max_tokens or t.seq_len
    for pos, index in enumerate(ids):
        name, (f, offset) = _locate(instances, int(index))
        tokens = instances.tokens(int(index))
        micro_batch, within = divmod(pos, micro)
        rank = within // t.local_batch_size
        rec = {"position": pos, "instance": int(index), **({"source": name} if name else {}), "file": f.path,
               "token_offset": offset, "dp_rank": rank, "micro_batch": micro_batch, "ids": tokens[:k].tolist(),
               "text": tokenizer.decode(tokens[:k].tolist())}
        if args.json:
            print(json.dumps(rec))
        else:
            where = f"source {name}: " if name else ""
            print(f"[{pos}] instance {index} ({where}{os.path.basename(f.path)} @ token {offset}) -> dp rank {rank}, "
                  f"micro-batch {micro_batch}")
            print(f"    ids:  {rec['ids']}{' ...' if k < t.seq_len else ''}")
            print(f"    text: {rec['text']!r}")
    return 0


def _locate(instances, index: int):
    """(source name or None, (file, token offset)) of an instance of a flat dataset or a mixture."""
    shares = getattr(instances, "shares", None)
    if shares is None:
        return None, instances.locate(index)
    i = int(instances.source_of(np.array([index]))[0])
    local = index - sum(len(s.instances) for s in shares[:i])
    return shares[i].name, shares[i].instances.locate(local)


if __name__ == "__main__":
    sys.exit(main())
