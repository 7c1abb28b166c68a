#!/usr/bin/env python
"""A DCP checkpoint (a training step folder, export, seed or converted folder) -> Hugging Face format.

    python scripts/convert_dcp_to_hf.py STEP_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16]
        [--num-shards N] [--config TOML | --flavor NAME [--vocab-size V]]

Writes model-0000i-of-0000N.safetensors, model.safetensors.index.json and config.json,
loadable with transformers' AutoModelForCausalLM.from_pretrained(OUT_DIR). The model
(family, flavor, args) comes from --config/--flavor, else from the step folder's
.complete marker. Only the "model" entry is read, one block at a time (memory: a block and one output file, not the
model); optimizer and data state are ignored.
"""
from __future__ import annotations

import argparse
import os

from _checkpoint_cli import DTYPE_CHOICES, add_model_flags, main_guard, parse_dtype, resolve_model

from torchtitan.checkpoint.formats.hf import export_dcp_to_hf
from torchtitan.checkpoint.io import MARKER, ensure_new_output, read_marker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dcp_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored)")
    p.add_argument("--num-shards", type=int, default=0, help="number of safetensors files (0: files of about 4 GiB)")
    add_model_flags(p)
    a = p.parse_args()

    ensure_new_output(a.out_dir)
    marker = read_marker(a.dcp_dir) if os.path.isfile(os.path.join(a.dcp_dir, MARKER)) else {}
    model = resolve_model(a, marker, a.dcp_dir)
    count, dtype = export_dcp_to_hf(a.dcp_dir, a.out_dir, model, parse_dtype(a.dtype), a.num_shards)
    files = len([f for f in os.listdir(a.out_dir) if f.endswith(".safetensors")])
    print(f"wrote {a.out_dir}: {count} tensors in {files} safetensors file(s), dtype {dtype}")
    return 0


if __name__ == "__main__":
    main_guard(main)
