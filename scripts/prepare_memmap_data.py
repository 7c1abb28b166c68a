"""Tokenize text documents into raw memmap token files for `data.dataset = "memmap"`.

    python scripts/prepare_memmap_data.py --source pydoc --out-dir data/pydoc
    python scripts/prepare_memmap_data.py --source corpus/*.jsonl --tokenizer path/to/tokenizer.json \\
        --out-dir data/corpus --tokens-per-file 500000000

Sources: "pydoc" (the bundled offline corpus), a local json/jsonl/parquet/txt/csv/arrow
file or folder (read by `datasets`: one document per record, per line for .txt), or a
Hugging Face hub dataset name (streamed). Each document is
encoded and followed by the tokenizer's EOS, as OLMo's data is (no BOS); files
are headerless arrays of --dtype (uint16 if the vocabulary fits, else uint32),
cut at document boundaries once they exceed --tokens-per-file. The TOML lines
to train on the output are printed at the end and saved in prepare_info.json.
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

DEFAULT_TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
DTYPE_LIMITS = {"uint16": 2 ** 16, "uint32": 2 ** 32}


def pick_dtype(requested: str, vocab_size: int, tokenizer_path: str) -> str:
    """The requested dtype if every token id fits it; "auto" picks the smallest that fits."""
    if requested == "auto":
        return "uint16" if vocab_size <= DTYPE_LIMITS["uint16"] else "uint32"
    if vocab_size > DTYPE_LIMITS[requested]:
        raise SystemExit(f"error: tokenizer {tokenizer_path} has ids up to {vocab_size - 1}, which do not fit "
                         f"{requested} (max {DTYPE_LIMITS[requested] - 1}); use --dtype uint32")
    return requested


def documents(source: str, text_field: str):
    from torchtitan.datasets.text import DocumentSource

    if source == "pydoc":
        return DocumentSource("pydoc", None, text_field).iter_from(0)
    if os.path.exists(source):
        return DocumentSource(source, source, text_field).iter_from(0)
    return DocumentSource(source, None, text_field).iter_from(0)


class FileWriter:
    """Appends token arrays to out_dir/{prefix}-NNNNN.npy, rolling over at document boundaries."""

    def __init__(self, out_dir: str, prefix: str, dtype: str, tokens_per_file: int):
        self.out_dir, self.prefix, self.dtype, self.limit = out_dir, prefix, np.dtype(dtype), tokens_per_file
        self.paths: list[str] = []
        self.counts: list[int] = []
        self._f = None

    def _open(self) -> None:
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):05d}.npy")
        self.paths.append(path)
        self.counts.append(0)
        self._f = open(path, "wb")

    def write(self, ids: list[int]) -> None:
        if self._f is None or self.counts[-1] >= self.limit:
            self.close()
            self._open()
        self._f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.counts[-1] += len(ids)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="pydoc, a local file/folder, or a hub dataset name")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer file or folder (default: bundled)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--tokens-per-file", type=int, default=1 << 30)
    p.add_argument("--prefix", default="part")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    p.add_argument("--tokenizer-backend", default="auto", choices=["auto", "tokenizers"],
                   help="for HF tokenizer.json: auto uses tiktoken when it gives the same ids")
    args = p.parse_args(argv)

    from torchtitan.components.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_backend)
    dtype = pick_dtype(args.dtype, tokenizer.vocab_size, args.tokenizer)
    eos = tokenizer.eos_id
    os.makedirs(args.out_dir, exist_ok=True)
    if any(n.startswith(args.prefix + "-") and n.endswith(".npy") for n in os.listdir(args.out_dir)):
        raise SystemExit(f"error: {args.out_dir} already holds {args.prefix}-*.npy files; use an empty --out-dir "
                         f"or another --prefix")
    writer = FileWriter(args.out_dir, args.prefix, dtype, args.tokens_per_file)
    n_docs, batch = 0, []

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch, bos=False, eos=True):
            writer.write(ids)
        batch.clear()

    for text in documents(args.source, args.text_field):
        batch.append(text)
        n_docs += 1
        if len(batch) == args.batch_size:
            flush()
        if args.max_documents is not None and n_docs >= args.max_documents:
            break
    if batch:
        flush()
    writer.close()
    if n_docs == 0:
        raise SystemExit(f"error: source {args.source} has no documents")

    info = {"source": args.source, "tokenizer": os.path.abspath(args.tokenizer), "vocab_size": tokenizer.vocab_size,
            "eos_id": eos, "dtype": dtype, "documents": n_docs, "tokens": sum(writer.counts),
            "files": [{"path": os.path.abspath(p), "tokens": c} for p, c in zip(writer.paths, writer.counts)]}
    with open(os.path.join(args.out_dir, "prepare_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"{n_docs} documents -> {info['tokens']:,} tokens in {len(writer.paths)} file(s) under {args.out_dir}")
    print(f"dtype {dtype}; EOS id {eos} appended after every document (no BOS)")
    paths = ", ".join(json.dumps(os.path.abspath(p)) for p in writer.paths)
    print(f"train on it with:\n[training]\ndataset = \"memmap\"\nmemmap_dtype = \"{dtype}\"\nmemmap_paths = [{paths}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
