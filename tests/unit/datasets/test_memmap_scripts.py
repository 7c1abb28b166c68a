"""scripts/prepare_memmap_data.py and scripts/inspect_batch.py, in process and (where a user would) as commands."""
from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import load_config
from torchtitan.datasets.memmap import MemmapInstances, build_global_indices, token_files
from torchtitan.datasets.mixture import check_ratios, plan_sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import inspect_batch  # noqa: E402
import prepare_memmap_data  # noqa: E402

TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")


def test_prepare_writes_documents_separated_by_eos(tmp_path, capsys):
    assert prepare_memmap_data.main(["--source", "pydoc", "--out-dir", str(tmp_path), "--max-documents", "12",
                                     "--tokens-per-file", "4000"]) == 0
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "prepare_info.json").read_text())
    tok = build_tokenizer(TOKENIZER)
    assert f"EOS id {tok.eos_id}" in out and info["eos_id"] == tok.eos_id and info["dtype"] == "uint16"
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".npy"))
    assert len(files) > 1 and files == [f"part-{i:05d}.npy" for i in range(len(files))]
    ids = np.concatenate([np.fromfile(tmp_path / f, dtype=np.uint16) for f in files])
    assert len(ids) == info["tokens"] and ids[-1] == tok.eos_id
    assert (ids == tok.eos_id).sum() == 12  # one EOS after each document, files cut at document ends
    for f in files:
        assert np.fromfile(tmp_path / f, dtype=np.uint16)[-1] == tok.eos_id
    from torchtitan.datasets.text import pydoc_documents

    first = pydoc_documents()[0]
    assert tok.decode(ids[:ids.tolist().index(tok.eos_id)].tolist()) == first


def test_prepare_refuses_a_vocabulary_that_does_not_fit(tmp_path):
    with pytest.raises(SystemExit, match="do not fit uint16.*--dtype uint32"):
        prepare_memmap_data.pick_dtype("uint16", 100278, "dolma2/tokenizer.json")
    assert prepare_memmap_data.pick_dtype("auto", 100278, "x") == "uint32"
    assert prepare_memmap_data.pick_dtype("auto", 50280, "x") == "uint16"


def test_inspect_prints_global_batch_from_the_order(tmp_path, capsys):
    prepare_memmap_data.main(["--source", "pydoc", "--out-dir", str(tmp_path / "data"), "--max-documents", "20"])
    paths = [str(tmp_path / "data" / "part-00000.npy")]
    capsys.readouterr()
    args = ["--batch", "3", "--world-size", "2", "--json", "--max-tokens", "0",
            "--job.config_file", os.path.join(ROOT, "train_configs", "olmo2_debug.toml"),
            "--job.dump_folder", str(tmp_path / "run"), "--training.dataset", "memmap",
            "--training.memmap_paths", paths[0], "--training.seq_len", "32", "--training.local_batch_size", "2",
            "--training.global_batch_size", "8", "--training.seed", "5"]
    assert inspect_batch.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    inst = MemmapInstances(paths, "uint16", 32)
    order = build_global_indices(len(inst), 5, 0)
    assert [r["instance"] for r in rows] == order[24:32].tolist()
    assert ([r["dp_rank"] for r in rows] == [0, 0, 1, 1, 0, 0, 1, 1]
            and [r["micro_batch"] for r in rows] == [0] * 4 + [1] * 4)
    tok = build_tokenizer(TOKENIZER)
    for r in rows:
        assert r["ids"] == inst.tokens(r["instance"]).tolist() and r["text"] == tok.decode(r["ids"])


# --- scale: workers, streamed and compressed inputs, per-source folders, document metadata, errors

SCRIPT = os.path.join(ROOT, "scripts", "prepare_memmap_data.py")
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None


def corpus(n: int = 300) -> list[str]:
    """Small documents of varied length, with the odd characters a crawl has (empty, newlines, specials)."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "世界", "<|end_of_text|>", "\t", "x" * 30, "3.14"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 80))) for _ in range(n)]
    docs[5], docs[9] = "", "line one\nline two\r\nthree"
    return docs


def write_jsonl(path, docs: list[str]) -> None:
    """JSON Lines in the given compression (by suffix), with a blank line that readers must skip."""
    data = "".join(json.dumps({"id": i, "text": d}) + ("\n\n" if i == 3 else "\n") for i, d in enumerate(docs))
    raw = data.encode()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    elif str(path).endswith(".zst"):
        import zstandard

        half = len(raw) // 2  # two frames, as parallel compressors write them
        c = zstandard.ZstdCompressor()
        raw = c.compress(raw[:half]) + c.compress(raw[half:])
    path.write_bytes(raw)


def run_script(*args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def output_files(folder) -> dict[str, bytes]:
    """Token and metadata files of a folder, by name (prepare_info.json holds absolute paths: left out)."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n.endswith((".npy", ".csv.gz"))}


def read_rows(path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.array([[int(v) for v in line.split(",")] for line in f], dtype=np.int64).reshape(-1, 2)


def npy_paths(folder) -> list[str]:
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".npy"))


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", pytest.param(
    "jsonl.zst", marks=pytest.mark.skipif(not HAVE_ZSTD, reason="zstandard is not installed"))])
def test_workers_write_identical_files(tmp_path, suffix):
    docs = corpus()
    src = tmp_path / f"corpus.{suffix}"
    write_jsonl(src, docs)
    common = ["--source", str(src), "--tokens-per-file", "2000", "--batch-size", "16"]
    for workers in ("1", "2"):
        proc = run_script(*common, "--out-dir", str(tmp_path / f"w{workers}"), "--workers", workers)
        assert proc.returncode == 0, proc.stderr
        assert f"{len(docs)} documents ->" in proc.stdout
    one, two = output_files(tmp_path / "w1"), output_files(tmp_path / "w2")
    assert len(one) > 4 and one == two  # several files: chunks of 16 documents cross file boundaries
    assert sorted(one) == sorted([f"part-{i:05d}{ext}" for i in range(len(one) // 2) for ext in (".npy", ".csv.gz")])
    # The same documents uncompressed, in process, with another chunk size: the same bytes again.
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, docs)
    assert prepare_memmap_data.main(["--source", str(plain), "--tokens-per-file", "2000", "--batch-size", "7",
                                     "--out-dir", str(tmp_path / "plain")]) == 0
    assert output_files(tmp_path / "plain") == one


def test_metadata_rows_are_documents_ending_at_eos_and_ids_are_overridden(tmp_path, capsys):
    docs = corpus()
    src = tmp_path / "corpus.jsonl"
    write_jsonl(src, docs)
    # OLMo's style of override; 0 is this vocabulary's BOS, never produced by text, so EOS marks exactly the ends.
    assert prepare_memmap_data.main(["--source", str(src), "--out-dir", str(tmp_path / "out"), "--tokens-per-file",
                                     "1500", "--eos-id", "0", "--pad-id", "1"]) == 0
    assert "EOS id 0 appended" in capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "prepare_info.json").read_text())
    assert (info["eos_id"], info["pad_id"], info["documents"]) == (0, 1, len(docs))
    tok = build_tokenizer(TOKENIZER)
    texts = []
    for entry in info["files"]:
        ids = np.memmap(entry["path"], dtype=np.uint16, mode="r")
        rows = read_rows(entry["metadata"])
        assert entry["metadata"].endswith(".csv.gz") and len(rows) == entry["documents"]
        assert rows[0, 0] == 0 and rows[-1, 1] == len(ids) == entry["tokens"]
        assert (rows[1:, 0] == rows[:-1, 1]).all()  # contiguous: every token belongs to one document
        assert (np.flatnonzero(ids == 0) == rows[:, 1] - 1).all()  # end exclusive, EOS the last token
        texts += [tok.decode(ids[s:e - 1].tolist()) for s, e in rows]
    assert texts == docs
    # The trainer globs folders for token files: the metadata files are not among them.
    assert token_files(str(tmp_path / "out")) == [e["path"] for e in info["files"]]


def olmo_chunks(paths: list[str], dtype, seq_len: int) -> list[np.ndarray]:
    """Instances the way OLMo's MemMapDataset cuts them: per file, tokens[i*seq_len:(i+1)*seq_len], no remainder."""
    out = []
    for path in paths:
        tokens = np.memmap(path, dtype=dtype, mode="r")
        out += [np.asarray(tokens[i * seq_len:(i + 1) * seq_len]) for i in range(len(tokens) // seq_len)]
    return out


def test_output_reads_as_olmo_memmap_instances(tmp_path):
    docs = corpus()
    src = tmp_path / "corpus.jsonl.gz"
    write_jsonl(src, docs)
    assert run_script("--source", str(src), "--out-dir", str(tmp_path / "out"), "--tokens-per-file", "3000",
                      "--workers", "2").returncode == 0
    paths = npy_paths(tmp_path / "out")
    tok = build_tokenizer(TOKENIZER)
    expected = [ids for d in docs for ids in tok.encode(d, bos=False, eos=True)]
    assert np.concatenate([np.memmap(p, dtype=np.uint16, mode="r") for p in paths]).tolist() == expected
    chunks = olmo_chunks(paths, np.uint16, 64)
    ours = MemmapInstances(paths, "uint16", 64)
    assert len(chunks) == len(ours) and all((c == ours.tokens(i)).all() for i, c in enumerate(chunks))


def test_olmo_memmap_dataset_reads_the_output(tmp_path):
    olmo_memmap = pytest.importorskip("olmo.data.memmap_dataset")
    docs = corpus()
    src = tmp_path / "corpus.jsonl"
    write_jsonl(src, docs)
    assert prepare_memmap_data.main(["--source", str(src), "--out-dir", str(tmp_path / "out"),
                                     "--tokens-per-file", "3000", "--eos-id", "0"]) == 0
    paths = npy_paths(tmp_path / "out")
    ds = olmo_memmap.MemMapDataset(*paths, chunk_size=64, memmap_dtype=np.uint16, generate_doc_lengths=True,
                                   eos_token_id=0)
    chunks = olmo_chunks(paths, np.uint16, 64)
    assert len(ds) == len(chunks) > 10
    # Document lengths per instance from our metadata rows, to compare with OLMo's (found from EOS positions).
    doc_lens = []
    for path in paths:
        ends = read_rows(path[:-len(".npy")] + ".csv.gz")[:, 1]
        for a in range(0, len(np.memmap(path, dtype=np.uint16, mode="r")) // 64 * 64, 64):
            cuts = ends[(ends > a) & (ends <= a + 64)].tolist()
            doc_lens.append(np.diff([a, *cuts] + ([a + 64] if not cuts or cuts[-1] < a + 64 else [])).tolist())
    for i, chunk in enumerate(chunks):
        item = ds[i]
        assert item["input_ids"].tolist() == chunk.tolist()
        assert item["doc_lens"].tolist() == doc_lens[i]


def test_named_sources_write_one_folder_each(tmp_path, capsys):
    src = tmp_path / "web.jsonl.gz"
    write_jsonl(src, corpus(120))
    out = tmp_path / "mix"
    assert prepare_memmap_data.main(["--source", f"web={src}", "--source", "docs=pydoc", "--max-documents", "30",
                                     "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[[data.sources]]" in printed and "memmap_paths" not in printed
    info = json.loads((out / "prepare_info.json").read_text())
    config = tomllib.loads(info["toml"])
    assert config["data"]["dataset"] == "memmap" and config["data"]["memmap_dtype"] == "uint16"
    sources = config["data"]["sources"]
    assert [s["name"] for s in sources] == ["web", "docs"]
    for s, per_source in zip(sources, info["sources"]):
        assert s["max_repetition"] == 1.0 and 0 < s["target_ratio"] < 1
        assert s["paths"] == [os.path.join(str(out), s["name"], "*.npy")]
        assert sorted(glob.glob(s["paths"][0])) == [f["path"] for f in per_source["files"]]
        assert per_source["documents"] == 30
        assert json.loads((out / s["name"] / "prepare_info.json").read_text())["name"] == s["name"]
    # The trainer takes the tables as printed: its config loader and its mixture checks accept them.
    (tmp_path / "mix.toml").write_text(info["toml"])
    cfg = load_config(["--job.config_file", str(tmp_path / "mix.toml")], env={})
    check_ratios(cfg.data.sources)
    shares = plan_sources(cfg.data.sources, dtype="uint16", seq_len=16, budget=8)
    assert [s.name for s in shares] == ["web", "docs"]


def test_placeholder_ratios_sum_to_one_and_none_is_zero():
    for tokens in ([7], [1, 10 ** 9], [1, 1, 1], [10 ** 9, 1, 1, 1, 1], list(range(1, 40))):
        ratios = prepare_memmap_data.placeholder_ratios(tokens)
        assert abs(sum(ratios) - 1) < 1e-9 and all(0 < r <= 1 for r in ratios)
    assert prepare_memmap_data.placeholder_ratios([1, 3]) == [0.25, 0.75]


def test_streamed_readers_give_the_documents_datasets_gives(tmp_path):
    """The streamed .jsonl/.txt/.parquet readers replace `datasets` for those files: same documents, same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from torchtitan.datasets.text import DocumentSource

    docs = corpus(60)
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "a.txt").write_bytes("first\n\nsecond\r\nthird\rfourth\x0cstill\u2028fourth\nlast".encode())
    pq.write_table(pa.table({"text": docs, "id": list(range(60))}), tmp_path / "a.parquet", row_group_size=16)
    for name in ("a.jsonl", "a.txt", "a.parquet"):
        path = str(tmp_path / name)
        expected = list(DocumentSource(path, path, "text").iter_from(0))
        assert list(prepare_memmap_data.read_file(path, "text")) == expected


def test_chunked_writes_cut_files_where_document_writes_do(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    flat = rng.integers(2, 2000, size=int(lengths.sum())).astype(np.uint16)
    ends = np.cumsum(lengths)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    by_doc = prepare_memmap_data.FileWriter(str(tmp_path / "a"), "part", "uint16", 100)
    for s, e in zip(ends - lengths, ends):
        by_doc.write(flat[s:e].tolist())
    by_doc.close()
    by_chunk = prepare_memmap_data.FileWriter(str(tmp_path / "b"), "part", "uint16", 100)
    for i in range(0, 200, 13):
        lo, hi = (ends[i - 1] if i else 0), ends[min(i + 13, 200) - 1]
        by_chunk.write_chunk(flat[lo:hi], lengths[i:i + 13])
    by_chunk.close()
    assert by_doc.counts == by_chunk.counts and output_files(tmp_path / "a") == output_files(tmp_path / "b")
    assert all(c >= 100 for c in by_doc.counts[:-1]) and all(c - 40 < 100 for c in by_doc.counts)


BAD_JSONL = "\n".join([json.dumps({"text": f"document {i}"}) for i in range(100)] + ["{not json"]) + "\n"


@pytest.mark.parametrize("case", ["missing", "name", "extension", "dtype", "eos", "pad", "several bare", "bad line"])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case):
    good = tmp_path / "good.jsonl"
    good.write_text(BAD_JSONL.rsplit("{", 1)[0])
    (tmp_path / "bad.jsonl").write_text(BAD_JSONL)
    (tmp_path / "notes.md").write_text("hello\n")
    big_vocab = tmp_path / "tokenizer.json"  # ids up to 70000: no uint16
    big_vocab.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
                                     "pre_tokenizer": {"type": "Whitespace"}, "decoder": None, "truncation": None,
                                     "padding": None, "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
                                         "[UNK]": 0, "a": 1, "<|endoftext|>": 70000}}}))
    args, message = {
        "missing": (["--source", str(tmp_path / "nope.jsonl")], "no such file or folder"),
        "name": (["--source", f"we/b={good}"], "expected NAME=PATH"),
        "extension": (["--source", str(tmp_path / "notes.md")], "unknown extension"),
        "dtype": (["--source", str(good), "--tokenizer", str(big_vocab), "--dtype", "uint16"], "do not fit uint16"),
        "eos": (["--source", str(good), "--eos-id", "2048"], "--eos-id 2048 is outside the vocabulary"),
        "pad": (["--source", str(good), "--pad-id", "-1"], "--pad-id -1 is outside the vocabulary"),
        "several bare": (["--source", f"a={good}", "--source", str(good)], "give each as NAME=PATH"),
        # Fails after the first chunks were written: those files are removed again.
        "bad line": (["--source", f"a={good}", "--source", f"b={tmp_path / 'bad.jsonl'}", "--batch-size", "8",
                      "--workers", "2"], "bad.jsonl:101: not a JSON record"),
    }[case]
    proc = run_script(*args, "--out-dir", str(tmp_path / "out" / "data"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_zst_without_zstandard_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else real(name, *a))
    assert prepare_memmap_data.main(["--source", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install zstandard" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
