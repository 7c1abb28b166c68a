"""What run_train.sh runs: validate the job in this one process, then start the workers through torchrun.

    python -m torchtitan.launch [torchrun options] -m torchtitan.train --job.config_file X [--section.key value ...]

A bad config (a typo, degrees that do not fit the world, a missing file) is one line on stderr and exit code 2,
before any worker or process group exists, also on a cluster allocation. A worker that stops on a user error
has printed its one line (exit code 3); a crash has printed its traceback, and this launcher adds one line
naming the rank instead of torchrun's ChildFailedError traceback.
"""
from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, parse_min_max_nnodes, run

from torchtitan.tools.errors import EXIT_CONFIG_ERROR, EXIT_USER_ERROR
from torchtitan.tools.logging import init_logging
from torchtitan.trainer.plan import check_job


def _world_size(args) -> int | None:
    """nnodes x processes per node when both are fixed (an elastic node range decides it at rendezvous)."""
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    if min_nodes != max_nodes or not str(args.nproc_per_node).isdigit():
        return None
    return max_nodes * int(args.nproc_per_node)


def main(argv: list[str] | None = None) -> int:
    init_logging()
    # torchrun's agent logs each failed worker and its closing signals; the summary line below says it once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.module and args.training_script == "torchtitan.train":
        checked = check_job(list(args.training_script_args), _world_size(args), env=os.environ)
        if isinstance(checked, int):
            return checked
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (EXIT_CONFIG_ERROR, EXIT_USER_ERROR):
            return failure.exitcode  # the worker said why, in one line
        code = failure.exitcode if failure.exitcode > 0 else 1
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        print(f"error: training stopped: rank {rank} ended with {how}; its log above says why",
              file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
