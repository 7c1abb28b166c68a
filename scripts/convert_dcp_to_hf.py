#!/usr/bin/env python
"""A DCP checkpoint (a training step folder, export, seed or converted folder) -> Hugging Face format.

    python scripts/convert_dcp_to_hf.py STEP_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16]
        [--num-shards N] [--config TOML | --flavor NAME [--vocab-size V]]

Writes model-0000i-of-0000N.safetensors, model.safetensors.index.json and config.json,
loadable with transformers' AutoModelForCausalLM.from_pretrained(OUT_DIR). The model
(family, flavor, args) comes from --config/--flavor, else from the step folder's
.complete marker. Only the "model" entry is read; optimizer and data state are ignored.
"""
from __future__ import annotations

import argparse
import os

from _checkpoint_cli import DTYPE_CHOICES, add_model_flags, main_guard, parse_dtype, resolve_model

from torchtitan.checkpoint.formats.hf import write_hf_folder
from torchtitan.checkpoint.io import (
    MARKER,
    check_fits,
    ensure_new_output,
    expected_shapes,
    read_marker,
    read_model_from_dcp,
    state_shapes,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dcp_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored)")
    p.add_argument("--num-shards", type=int, default=1, help="number of safetensors files")
    add_model_flags(p)
    a = p.parse_args()

    ensure_new_output(a.out_dir)
    marker = read_marker(a.dcp_dir) if os.path.isfile(os.path.join(a.dcp_dir, MARKER)) else {}
    model = resolve_model(a, marker, a.dcp_dir)
    sd, _ = read_model_from_dcp(a.dcp_dir)
    check_fits(a.dcp_dir, state_shapes(sd), expected_shapes(model.spec, model.args), union_across_ranks=False)
    count, dtype = write_hf_folder(sd, model.spec.adapter(model.args), a.out_dir, parse_dtype(a.dtype), a.num_shards)
    print(f"wrote {a.out_dir}: {count} tensors in {a.num_shards} safetensors file(s), dtype {dtype}")
    return 0


if __name__ == "__main__":
    main_guard(main)
