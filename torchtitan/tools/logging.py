"""Console logging: one format for every rank; run_train.sh picks which ranks print (LOG_RANK)."""
import logging
import os


def init_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logger = logging.getLogger("torchtitan")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for name in ("torchtitan.datasets", "torchtitan.datasets.text"):
        logging.getLogger(name).parent = logger
