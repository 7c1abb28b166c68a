"""Text documents -> packed token windows, numbered globally.

Every rank walks the same document stream and packs the same windows; global
micro-batch m is windows [m*G, (m+1)*G) with G = local_batch_size x dp, and dp
rank r keeps windows [m*G + r*B, m*G + (r+1)*B). The sequences of a global
batch therefore do not depend on the number of ranks, and the iterator state
(epoch, document, leftover tokens, window) is identical on all ranks, so it can
be resumed by any data-parallel size with the same global batch.

The price is that each rank tokenizes the whole stream (about 1/dp of it is
used): fine for local corpora and hub streams at modest dp; for large-scale
runs use pre-tokenized memmap data (docs/datasets.md).
"""
from __future__ import annotations

import array
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from torchtitan.tools.errors import DataError

logger = logging.getLogger(__name__)

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
                  ".csv": "csv", ".arrow": "arrow"}


PYDOC_HELDOUT_SHARE = 0.05  # the last 5% of every topic (from a paragraph break) is held out of training


def pydoc_documents(split: str = "train") -> list[str]:
    """Python's bundled reference documentation: an offline corpus every Python has, one document per topic.
    "train" (dataset pydoc) keeps each topic but its last ~5% (cut at a paragraph break), which "heldout"
    (dataset pydoc_heldout, the default validation set) holds; "all": the topics whole."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [topics[k] for k in sorted(topics)]
    if split == "all":
        return docs
    out = []
    for doc in docs:
        cut = doc.find("\n\n", int(len(doc) * (1 - PYDOC_HELDOUT_SHARE)))
        head, tail = (doc, "") if cut < 0 else (doc[:cut], doc[cut + 2:])
        part = tail if split == "heldout" else head
        if part.strip():
            out.append(part)
    return out


def _local_files(path: str) -> tuple[str, list[str]]:
    if os.path.isdir(path):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
                       if os.path.splitext(f)[1] in _LOCAL_FORMATS)
        if not files:
            raise DataError(f"data.dataset_path {path}: no {'/'.join(sorted(_LOCAL_FORMATS))} files in this folder")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data.dataset_path {path}: no such file or folder")
    kinds = {_LOCAL_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"data.dataset_path {path}: files must all be one of {', '.join(sorted(_LOCAL_FORMATS))}")
    return kinds.pop(), files


class DocumentSource:
    """Indexable or streamed documents, with a way to restart at document i."""

    def __init__(self, name: str, path: str | None, text_field: str, shuffle_seed: int | None = None):
        self.name, self.path, self.text_field = name, path, text_field
        # Indexable sources are read in an order that depends only on (seed, epoch): batches mix
        # documents instead of walking one topic at a time. None keeps file order.
        self.shuffle_seed = shuffle_seed
        self._docs: Sequence | None = None
        self._streaming = False
        if path:
            kind, files = _local_files(path)
            import datasets

            ds = datasets.load_dataset(kind, data_files=files, split="train")
            if text_field not in ds.column_names:
                raise DataError(f"data.dataset_path {path}: no column '{text_field}' "
                                 f"(columns: {', '.join(ds.column_names)}); set data.dataset_text_field")
            self._docs = ds
        elif name in ("pydoc", "pydoc_heldout"):
            self._docs = pydoc_documents("heldout" if name == "pydoc_heldout" else "train")
        else:
            self._streaming = True  # hub datasets: streamed, needs internet

    def _hub(self):
        import datasets

        if self.name in ("c4", "c4_validation"):  # torchtitan's names for C4's splits
            split = "validation" if self.name == "c4_validation" else "train"
            return datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
        return datasets.load_dataset(self.name, split="train", streaming=True)

    def order(self, epoch: int):
        n = len(self._docs)
        if self.shuffle_seed is None:
            return range(n)
        import numpy as np

        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(n).tolist()

    def iter_from(self, start: int, epoch: int = 0) -> Iterator[str]:
        if self._docs is not None:
            order = self.order(epoch)
            for i in range(start, len(self._docs)):
                doc = self._docs[order[i]]
                yield doc if isinstance(doc, str) else doc[self.text_field]
        else:
            # Streams have no random access: resuming skips documents (slow but exact).
            for doc in self._hub().skip(start):
                yield doc[self.text_field]


class PackedWindows(IterableDataset):
    """Yields {"input": (seq_len,), "label": (seq_len,)} for this dp rank's share of each global batch."""

    def __init__(self, source: DocumentSource, encode_batch: Callable[[list[str]], list[list[int]]], seq_len: int,
                 local_batch_size: int, dp_rank: int, dp_degree: int, infinite: bool = True, encode_chunk: int = 64):
        self.source, self.encode_batch, self.seq_len = source, encode_batch, seq_len
        self.local_batch_size, self.dp_rank, self.dp_degree = local_batch_size, dp_rank, dp_degree
        self.infinite, self.encode_chunk = infinite, encode_chunk
        self.group = local_batch_size * dp_degree
        # "offset": tokens of "buffer" already packed (only non-zero while a document is being cut).
        self._state = {"epoch": 0, "doc_index": 0, "window_index": 0, "buffer": [], "offset": 0}

    # Position of the global stream; same on every rank at batch boundaries.
    def state_dict(self) -> dict:
        s = self._state
        return {"epoch": s["epoch"], "doc_index": s["doc_index"], "window_index": s["window_index"],
                "buffer": s["buffer"][s["offset"]:]}

    def load_state_dict(self, state: dict) -> None:
        if state["window_index"] % self.group:
            raise DataError(
                f"dataloader checkpoint is at window {state['window_index']}, not a multiple of the global micro-batch "
                f"{self.group} (local_batch_size x dp): keep local_batch_size x dp the same when changing GPU count")
        self._state = {"epoch": int(state["epoch"]), "doc_index": int(state["doc_index"]),
                       "window_index": int(state["window_index"]), "buffer": list(state["buffer"]), "offset": 0}

    def _windows(self) -> Iterator[list[int]]:
        """Global windows of seq_len+1 tokens, updating the resumable position as it goes."""
        s = self._state
        n = self.seq_len + 1
        while True:
            docs = self.source.iter_from(s["doc_index"], s["epoch"])
            exhausted = False
            while not exhausted:
                chunk = []
                for doc in docs:
                    chunk.append(doc)
                    if len(chunk) == self.encode_chunk:
                        break
                if len(chunk) < self.encode_chunk:
                    exhausted = True
                for ids in self.encode_batch(chunk):
                    s["doc_index"] += 1
                    buf = s["buffer"]
                    buf.extend(ids)
                    # Windows are read at an offset and the buffer compacted once per document, so a
                    # long document costs linear, not quadratic, copying.
                    while len(buf) - s["offset"] >= n:
                        start = s["offset"]
                        # Consecutive windows do not overlap: the label of a window's last
                        # token starts the next window, as in torchtitan's packing.
                        s["offset"] = start + n
                        s["window_index"] += 1
                        yield buf[start:start + n]
                    del buf[:s["offset"]]
                    s["offset"] = 0
            if not self.infinite:
                return
            if s["doc_index"] == 0:
                raise DataError(f"dataset {self.source.path or self.source.name} has no documents")
            s["epoch"] += 1
            s["doc_index"] = 0
            logger.info("dataset %s: starting epoch %d (re-looping over the data)",
                        self.source.path or self.source.name, s["epoch"])

    def __iter__(self):
        lo, hi = self.dp_rank * self.local_batch_size, (self.dp_rank + 1) * self.local_batch_size
        block: list[list[int]] = []
        for window in self._windows():
            block.append(window)
            if len(block) == self.group:
                # The whole global micro-batch is packed before this rank yields its share,
                # so the saved position is always at a global boundary.
                for w in block[lo:hi]:
                    # array -> frombuffer is several times cheaper than torch.tensor(list) per window.
                    t = torch.frombuffer(array.array("q", w), dtype=torch.long)
                    yield {"input": t[:-1], "label": t[1:]}
                block = []
