"""Tokenize text documents into raw memmap token files for `data.dataset = "memmap"`.

    python scripts/prepare_memmap_data.py --source pydoc --out-dir data/pydoc
    python scripts/prepare_memmap_data.py --source 'corpus/*.jsonl.gz' --tokenizer path/to/tokenizer.json \\
        --out-dir data/corpus --tokens-per-file 500000000
    python scripts/prepare_memmap_data.py --source web=crawl/ --source code=code.jsonl.zst --workers 8 \\
        --out-dir data/mix --eos-id 50279 --pad-id 1

Sources: "pydoc" (the bundled offline corpus), a local file, folder or quoted glob, or a
Hugging Face hub dataset name (streamed). Local .jsonl/.json/.txt files, optionally
compressed (.gz, or .zst with the zstandard package), and .parquet files are streamed one
document at a time (a record's --text-field; one document per line for .txt; a .json file
holding one JSON array is read whole); .csv/.arrow files are read by `datasets`. A folder
is read in sorted file order (files of other extensions are skipped). `--source NAME=PATH`,
given once or several times, writes each source into <out-dir>/NAME/.

Each document is encoded and followed by the EOS id (the tokenizer's, or --eos-id), as
OLMo's data is (no BOS); files are headerless arrays of --dtype (uint16 if the vocabulary
fits, else uint32), cut at document boundaries once they exceed --tokens-per-file. Beside
each token file, part-NNNNN.csv.gz holds one "start,end" row of token offsets per document
(end exclusive, EOS included). --workers N tokenizes fixed-size chunks of documents in N
processes; chunks are written in order, so the files do not depend on N. The TOML lines to
train on the output are printed at the end and saved in prepare_info.json.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
# Extension -> reader. Streamed formats may be compressed; .csv/.arrow go through `datasets` as before.
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
           ".csv": "datasets", ".arrow": "datasets"}
COMPRESSIONS = (".gz", ".zst")
STREAMED = ("json", "text")  # the formats a .gz/.zst suffix may follow
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
METADATA_SUFFIX = ".csv.gz"  # never .npy/.bin: the trainer globs folders for those


class UserError(SystemExit):
    """A mistake in the command line or the inputs: main prints the one-line message and exits 2."""


def pick_dtype(requested: str, vocab_size: int, tokenizer_path: str) -> str:
    """The requested dtype if every token id fits it; "auto" picks the smallest that fits."""
    from torchtitan.datasets.memmap import token_dtype
    from torchtitan.tools.errors import DataError

    try:
        return token_dtype(requested, vocab_size, tokenizer_path)
    except DataError as e:
        raise UserError(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One --source: where its documents come from and the folder its token files go to."""

    name: str | None  # None: a bare --source, written straight into --out-dir
    spec: str  # as given: pydoc, a path or a hub name
    kind: str = "hub"  # pydoc | local | hub
    files: list[str] = field(default_factory=list)
    out_dir: str = ""


def file_format(path: str) -> tuple[str, str] | None:
    """(reader, compression suffix or "") from a file name, or None when no reader takes it."""
    base, ext = os.path.splitext(path)
    comp = ""
    if ext.lower() in COMPRESSIONS:
        comp, (base, ext) = ext.lower(), os.path.splitext(base)
    fmt = FORMATS.get(ext.lower())
    if fmt is None or (comp and fmt not in STREAMED):
        return None
    return fmt, comp


def _known_extensions() -> str:
    return "/".join(sorted(FORMATS)) + " (.json/.jsonl/.txt also as .gz or .zst)"


def local_files(path: str) -> list[str]:
    """The readable files of a file or folder (a folder: recursively, in sorted path order)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if file_format(f))
        if not files:
            raise UserError(f"error: {path}: no {_known_extensions()} files in this folder")
    else:
        if file_format(path) is None:
            raise UserError(f"error: {path}: unknown extension; expected one of {_known_extensions()}")
        files = [path]
    if any(f.lower().endswith(".zst") for f in files) and importlib.util.find_spec("zstandard") is None:
        raise UserError(f"error: {path}: reading .zst files needs the zstandard package: pip install zstandard")
    return files


def looks_local(spec: str) -> bool:
    """A spec that can only mean a local path (so a missing one is an error, not a hub lookup)."""
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or file_format(spec) is not None \
        or spec.lower().endswith(COMPRESSIONS)


def parse_source(value: str) -> Source:
    """NAME=PATH, or a bare PATH / pydoc / hub name (a path that exists is bare even with an '=')."""
    name, spec = None, value
    if "=" in value and not os.path.exists(os.path.expanduser(value)):
        name, _, spec = value.partition("=")
        if not NAME_RE.fullmatch(name) or not spec:
            raise UserError(f"error: --source {value!r}: expected NAME=PATH with a NAME of letters, digits, '_', "
                            f"'-' and '.', or a bare path, pydoc or hub dataset name")
    src = Source(name, spec)
    path = os.path.expanduser(spec)
    if spec == "pydoc":
        src.kind = "pydoc"
    elif os.path.exists(path):
        src.kind, src.files = "local", local_files(path)
    elif any(c in spec for c in "*?["):  # a quoted glob: its matches in sorted order
        matches = sorted(glob.glob(path))
        if not matches:
            raise UserError(f"error: --source {value!r}: no file matches {spec}")
        src.kind, src.files = "local", [f for m in matches for f in local_files(m)]
    elif looks_local(spec):
        raise UserError(f"error: --source {value!r}: {spec}: no such file or folder")
    return src


def parse_sources(values: list[str], out_dir: str) -> list[Source]:
    """Every --source, checked before anything is written; several sources must all be named."""
    sources = [parse_source(v) for v in values]
    if len(sources) > 1 and any(s.name is None for s in sources):
        bare = next(s.spec for s in sources if s.name is None)
        raise UserError(f"error: --source {bare!r}: with several sources give each as NAME=PATH "
                        f"(it is written into {out_dir}/NAME/)")
    names = [s.name for s in sources if s.name]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"error: --source name {dup!r} is given twice: each source needs its own folder")
    for s in sources:
        s.out_dir = os.path.join(out_dir, s.name) if s.name else out_dir
    return sources


# ----------------------------------------------------------------------------------------------- readers


def open_binary(path: str) -> io.BufferedIOBase:
    """A file as decompressed bytes, read incrementally (never the whole file in memory)."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        import zstandard

        # read_across_frames: files written in several frames (as parallel compressors do) read whole.
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def record_text(record, text_field: str, where: str) -> str:
    """The text of one JSON record, or a one-line error naming the record."""
    if not isinstance(record, dict):
        raise UserError(f"error: {where}: expected a JSON object with a {text_field!r} field")
    text = record.get(text_field)
    if not isinstance(text, str):
        what = "is not a string" if text_field in record else f"is missing (fields: {', '.join(record)})"
        raise UserError(f"error: {where}: field {text_field!r} {what}; set --text-field")
    return text


def read_json(path: str, text_field: str) -> Iterator[str]:
    """JSON Lines, one record at a time; a file that is one JSON array is read whole (it cannot stream)."""
    with open_binary(path) as f:
        if f.peek(4096).lstrip()[:1] == b"[":
            try:
                records = json.load(f)
            except ValueError as e:
                raise UserError(f"error: {path}: not valid JSON ({e})") from None
            for i, rec in enumerate(records):
                yield record_text(rec, text_field, f"{path}: record {i}")
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"error: {path}:{lineno}: not a JSON record ({e})") from None
            yield record_text(rec, text_field, f"{path}:{lineno}")


def read_text(path: str) -> Iterator[str]:
    """One document per line, as `datasets`' text loader splits them (universal newlines, break dropped)."""
    with io.TextIOWrapper(open_binary(path), encoding="utf-8") as f:
        try:
            for line in f:
                yield line.rstrip("\n")
        except UnicodeDecodeError as e:
            raise UserError(f"error: {path}: not UTF-8 text ({e})") from None


def read_parquet(path: str, text_field: str) -> Iterator[str]:
    """One row group batch at a time, only the text column."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"error: {path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"set --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"error: {path}: a row's {text_field!r} is {type(text).__name__}, not a string")
            yield text


def read_with_datasets(path: str, text_field: str) -> Iterator[str]:
    """.csv/.arrow through `datasets`, as this script always read them."""
    from torchtitan.datasets.text import DocumentSource
    from torchtitan.tools.errors import DataError

    try:
        src = DocumentSource(path, path, text_field)
    except DataError as e:
        raise UserError(f"error: {e}") from None
    for i, text in enumerate(src.iter_from(0)):
        if not isinstance(text, str):  # an empty csv cell reads as None
            raise UserError(f"error: {path}: row {i}'s {text_field!r} is {type(text).__name__}, not a string")
        yield text


def read_file(path: str, text_field: str) -> Iterator[str]:
    fmt = file_format(path)[0]
    if fmt == "json":
        return read_json(path, text_field)
    if fmt == "text":
        return read_text(path)
    if fmt == "parquet":
        return read_parquet(path, text_field)
    return read_with_datasets(path, text_field)


def hub_documents(name: str, text_field: str) -> Iterator[str]:
    """A hub dataset's train split, streamed; failing to open it is a one-line error."""
    from torchtitan.datasets.text import DocumentSource

    try:
        stream = iter(DocumentSource(name, None, text_field)._hub())
        first = next(stream, None)
    except Exception as e:  # noqa: BLE001 - any failure to open the stream means the same to the user
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"error: --source {name}: not a local file or folder, and the hub dataset could not be "
                        f"opened ({msg})") from None
    for i, doc in enumerate(itertools.chain([first] if first is not None else [], stream)):
        yield record_text(doc, text_field, f"{name}: record {i}")


def documents(source: Source, text_field: str) -> Iterator[str]:
    """Every document of one source, in order, one at a time."""
    if source.kind == "pydoc":
        from torchtitan.datasets.text import pydoc_documents

        return iter(pydoc_documents("train"))
    if source.kind == "local":
        return itertools.chain.from_iterable(read_file(f, text_field) for f in source.files)
    return hub_documents(source.spec, text_field)


def chunked(docs: Iterable[str], size: int, limit: int | None) -> Iterator[list[str]]:
    """Lists of `size` documents (the last may be shorter), at most `limit` documents in all."""
    docs = iter(docs) if limit is None else itertools.islice(docs, limit)
    while chunk := list(itertools.islice(docs, size)):
        yield chunk


# ----------------------------------------------------------------------------------------------- encoding

_WORKER: dict = {}


def init_encoder(tokenizer_path: str, backend: str, eos: int, dtype: str, single_thread: bool) -> None:
    """Per process: the tokenizer and what every chunk needs (module state, so chunks pickle small)."""
    if single_thread:  # N processes already use the cores; HF tokenizers' own threads would oversubscribe them
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from torchtitan.components.tokenizer import build_tokenizer

    _WORKER.update(tok=build_tokenizer(tokenizer_path, backend), eos=eos, dtype=np.dtype(dtype))


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all documents, each followed by EOS, as one array; per-document lengths with EOS)."""
    eos, dtype = _WORKER["eos"], _WORKER["dtype"]
    encoded = _WORKER["tok"].encode_batch(texts, bos=False, eos=False)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(ids, (eos,)) for ids in encoded),
                       dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def encoded_chunks(chunks: Iterable[list[str]], pool, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order. With a pool, at most 2 chunks per worker are in flight, so the
    corpus streams through in bounded memory whatever its size."""
    if pool is None:
        yield from map(encode_chunk, chunks)
        return
    pending: collections.deque = collections.deque()
    depth = 2 * workers
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def start_pool(workers: int, initargs: tuple):
    """N spawned processes (no fork: safe with threads and on every platform), or None to encode here."""
    if workers == 1:
        init_encoder(*initargs, False)
        return None
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(workers, initializer=init_encoder, initargs=(*initargs, True))


# ----------------------------------------------------------------------------------------------- writing


class FileWriter:
    """Appends documents to out_dir/{prefix}-NNNNN.npy, rolling over at document boundaries, and writes
    their boundaries to {prefix}-NNNNN.csv.gz ("start,end" token offsets, end exclusive)."""

    def __init__(self, out_dir: str, prefix: str, dtype: str, tokens_per_file: int):
        self.out_dir, self.prefix, self.dtype, self.limit = out_dir, prefix, np.dtype(dtype), tokens_per_file
        self.paths: list[str] = []
        self.counts: list[int] = []
        self.docs: list[int] = []
        self._f = self._meta = self._meta_raw = None

    @staticmethod
    def metadata_path(path: str) -> str:
        return path[:-len(".npy")] + METADATA_SUFFIX

    def _open(self) -> None:
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):05d}.npy")
        self.paths.append(path)
        self.counts.append(0)
        self.docs.append(0)
        self._f = open(path, "wb")
        self._meta_raw = open(self.metadata_path(path), "wb")
        # No file name and mtime 0 in the gzip header: the same documents give the same bytes on every run.
        self._meta = gzip.GzipFile(filename="", mode="wb", compresslevel=6, mtime=0, fileobj=self._meta_raw)

    def write_chunk(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as one token array and their lengths: each run of whole documents that fits the
        current file is one write (a file is full once it reaches the limit, after the document that did it)."""
        ends = np.cumsum(lengths)
        first = 0
        while first < len(lengths):
            if self._f is None or self.counts[-1] >= self.limit:
                self.close()
                self._open()
            base = int(ends[first - 1]) if first else 0
            # The document that brings the file to the limit is the last one in it.
            stop = min(int(np.searchsorted(ends, base + self.limit - self.counts[-1])) + 1, len(lengths))
            offset = self.counts[-1] - base
            doc_ends = ends[first:stop] + offset
            doc_starts = doc_ends - lengths[first:stop]
            self._f.write(flat[base:int(ends[stop - 1])].tobytes())
            self._meta.write("".join(f"{s},{e}\n" for s, e in zip(doc_starts.tolist(), doc_ends.tolist())).encode())
            self.counts[-1] += int(ends[stop - 1]) - base
            self.docs[-1] += stop - first
            first = stop

    def write(self, ids: list[int]) -> None:
        """One document (its EOS included)."""
        self.write_chunk(np.asarray(ids, dtype=self.dtype), np.array([len(ids)], dtype=np.int64))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._meta.close()  # writes the gzip trailer; the file under it stays open
            self._meta_raw.close()
            self._f = self._meta = self._meta_raw = None

    def remove(self) -> None:
        """Undo: delete every file this writer created."""
        self.close()
        for path in self.paths:
            for p in (path, self.metadata_path(path)):
                if os.path.exists(p):
                    os.remove(p)


def check_out_dir(out_dir: str, prefix: str) -> None:
    """Refuse to mix a new run's files with an earlier run's."""
    if os.path.isdir(out_dir) and any(n.startswith(prefix + "-") and n.endswith((".npy", METADATA_SUFFIX))
                                      for n in os.listdir(out_dir)):
        raise UserError(f"error: {out_dir} already holds {prefix}-*.npy files; use an empty --out-dir "
                        f"or another --prefix")


def make_dirs(path: str, created: list[str]) -> None:
    """os.makedirs, remembering which folders it created (to remove them again if the run fails)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        os.mkdir(p)
        created.append(p)


# ----------------------------------------------------------------------------------------------- report


def source_info(source: Source, writer: FileWriter, n_docs: int, meta: dict) -> dict:
    info = {"source": source.spec, **({"name": source.name} if source.name else {}), **meta, "documents": n_docs,
            "tokens": sum(writer.counts),
            "files": [{"path": os.path.abspath(p), "tokens": c, "documents": d,
                       "metadata": os.path.abspath(writer.metadata_path(p))}
                      for p, c, d in zip(writer.paths, writer.counts, writer.docs)]}
    return info


def placeholder_ratios(tokens: list[int], units: int = 10_000) -> list[float]:
    """Each source's share of the tokens in steps of 1/units, summing to exactly 1 (largest remainder) and none
    zero: the trainer wants ratios in (0, 1] that add up to 1."""
    exact = [units * t / sum(tokens) for t in tokens]
    counts = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(tokens)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:max(0, units - sum(counts))]:
        counts[i] += 1
    while sum(counts) > units:  # sources lifted to one unit are paid for by the largest
        counts[counts.index(max(counts))] -= 1
    return [c / units for c in counts]


def toml_lines(infos: list[dict], named: bool, dtype: str, out_dir: str) -> str:
    """The config to train on the output: today's memmap_paths for one bare source, [[data.sources]] per named one."""
    if not named:
        paths = ", ".join(json.dumps(f["path"]) for f in infos[0]["files"])
        return f"[training]\ndataset = \"memmap\"\nmemmap_dtype = \"{dtype}\"\nmemmap_paths = [{paths}]"
    ratios = placeholder_ratios([i["tokens"] for i in infos])
    lines = ["[data]", 'dataset = "memmap"', f'memmap_dtype = "{dtype}"', "",
             "# target_ratio: each source's share of the prepared tokens, max_repetition = 1.0: each token at most "
             "once; edit both"]
    for info, ratio in zip(infos, ratios):
        pattern = os.path.join(os.path.abspath(out_dir), info["name"], "*.npy")
        lines += ["[[data.sources]]", f"name = {json.dumps(info['name'])}", f"paths = [{json.dumps(pattern)}]",
                  f"target_ratio = {ratio}", "max_repetition = 1.0", ""]
    return "\n".join(lines).rstrip()


def report(sources: list[Source], infos: list[dict], meta: dict, args) -> None:
    """Print the summary and the TOML, and save them in prepare_info.json."""
    named = sources[0].name is not None
    toml = toml_lines(infos, named, meta["dtype"], args.out_dir)
    for source, info in zip(sources, infos):
        with open(os.path.join(source.out_dir, "prepare_info.json"), "w") as f:
            json.dump({**info, "toml": toml} if not named else info, f, indent=1)
        label = f"{source.name}: " if named else ""
        print(f"{label}{info['documents']} documents -> {info['tokens']:,} tokens in {len(info['files'])} file(s) "
              f"under {source.out_dir}")
    if named:
        with open(os.path.join(args.out_dir, "prepare_info.json"), "w") as f:
            json.dump({**meta, "sources": infos, "toml": toml}, f, indent=1)
    print(f"dtype {meta['dtype']}; EOS id {meta['eos_id']} appended after every document (no BOS)")
    pad = "" if meta["pad_id"] is None else f"; pad id {meta['pad_id']}"
    print(f"document boundaries: {args.prefix}-NNNNN{METADATA_SUFFIX} beside each token file (start,end per "
          f"document){pad}")
    print(f"train on it with:\n{toml}")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, action="append",
                   help="pydoc, a local file/folder, a hub dataset name, or NAME=one of those (repeatable: one "
                        "folder <out-dir>/NAME per source)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer file or folder (default: bundled)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--tokens-per-file", type=int, default=1 << 30)
    p.add_argument("--prefix", default="part")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents (per source)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call (and per worker chunk)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes; the output does not depend on it")
    p.add_argument("--eos-id", type=int, default=None, help="id appended after every document (default: the "
                                                            "tokenizer's EOS)")
    p.add_argument("--pad-id", type=int, default=None, help="pad id to record (default: the tokenizer's)")
    p.add_argument("--tokenizer-backend", default="auto", choices=["auto", "tokenizers"],
                   help="for HF tokenizer.json: auto uses tiktoken when it gives the same ids")
    args = p.parse_args(argv)
    for opt in ("tokens_per_file", "batch_size", "workers"):
        if getattr(args, opt) < 1:
            raise UserError(f"error: --{opt.replace('_', '-')} must be at least 1, not {getattr(args, opt)}")
    return args


def special_ids(args, tokenizer) -> tuple[int, int | None]:
    """EOS and pad ids, the tokenizer's unless overridden; both must be in the vocabulary."""
    eos = tokenizer.eos_id if args.eos_id is None else args.eos_id
    pad = tokenizer.pad_id if args.pad_id is None else args.pad_id
    for opt, value in (("--eos-id", eos), ("--pad-id", pad)):
        if value is not None and not 0 <= value < tokenizer.vocab_size:
            raise UserError(f"error: {opt} {value} is outside the vocabulary of {args.tokenizer} "
                            f"(ids 0..{tokenizer.vocab_size - 1})")
    return eos, pad


def load_tokenizer(args):
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.tools.errors import ConfigError

    try:
        return build_tokenizer(args.tokenizer, args.tokenizer_backend)
    except ConfigError as e:
        raise UserError(f"error: {e}") from None


def prepare(sources: list[Source], args, meta: dict, writers: list[FileWriter], created: list[str]) -> list[dict]:
    """Tokenize every source into its folder; returns each source's info."""
    infos = []
    pool = start_pool(args.workers, (args.tokenizer, args.tokenizer_backend, meta["eos_id"], meta["dtype"]))
    try:
        for source in sources:
            make_dirs(source.out_dir, created)
            writer = FileWriter(source.out_dir, args.prefix, meta["dtype"], args.tokens_per_file)
            writers.append(writer)
            n_docs = 0
            chunks = chunked(documents(source, args.text_field), args.batch_size, args.max_documents)
            for flat, lengths in encoded_chunks(chunks, pool, args.workers):
                writer.write_chunk(flat, lengths)
                n_docs += len(lengths)
            writer.close()
            if n_docs == 0:
                raise UserError(f"error: source {source.spec} has no documents")
            infos.append(source_info(source, writer, n_docs, meta))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return infos


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    sources = parse_sources(args.source, args.out_dir)
    tokenizer = load_tokenizer(args)
    dtype = pick_dtype(args.dtype, tokenizer.vocab_size, args.tokenizer)
    eos, pad = special_ids(args, tokenizer)
    for s in sources:
        check_out_dir(s.out_dir, args.prefix)
    meta = {"tokenizer": os.path.abspath(args.tokenizer), "vocab_size": tokenizer.vocab_size, "eos_id": eos,
            "pad_id": pad, "dtype": dtype}
    writers: list[FileWriter] = []
    created: list[str] = []
    try:
        infos = prepare(sources, args, meta, writers, created)
    except BaseException:
        # A failed run leaves nothing behind: partial token files would look like a finished dataset.
        for w in writers:
            w.remove()
        for d in reversed(created):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    report(sources, infos, meta, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(str(e).splitlines()[0] if str(e) else "error", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
