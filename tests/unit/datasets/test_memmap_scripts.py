"""scripts/prepare_memmap_data.py and scripts/inspect_batch.py, in process."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.datasets.memmap import MemmapInstances, build_global_indices

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
