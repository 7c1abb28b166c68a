"""Console logging: one format for every rank; run_train.sh picks which ranks print (LOG_RANK)."""
import logging
import os
import warnings


def init_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logger = logging.getLogger("torchtitan")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    # torchrun --tee already prefixes each line with the rank.
    prefix = "" if "TORCHELASTIC_RUN_ID" in os.environ else f"[rank{rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # torchdata calls a deprecated torch API on every loader construction.
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    for name in ("torchtitan.datasets", "torchtitan.datasets.text"):
        logging.getLogger(name).parent = logger
