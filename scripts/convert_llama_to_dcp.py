#!/usr/bin/env python
"""Meta original Llama weights (params.json + consolidated.NN.pth) -> a DCP step folder.

    python scripts/convert_llama_to_dcp.py META_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16]

Model-parallel shards are merged per tensor (see torchtitan/checkpoint/formats/meta.py
for the layout). OUT_DIR holds {"model": ...} in plain DCP plus a .complete marker, so
it works as checkpoint.initial_load_path, or as {dump_folder}/checkpoint/step-0 of a
new run. Nothing is written unless every tensor is present and fits the model.
"""
from __future__ import annotations

import argparse

from _checkpoint_cli import DTYPE_CHOICES, main_guard, parse_dtype

from torchtitan.checkpoint.formats.meta import llama_args_from_params, load_meta_checkpoint
from torchtitan.checkpoint.io import (
    ModelInfo,
    check_fits,
    expected_shapes,
    marker_info,
    state_shapes,
    write_model_checkpoint,
)
from torchtitan.models import get_train_spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("meta_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored, bf16 for "
                                                                          "Meta)")
    a = p.parse_args()

    sd, params = load_meta_checkpoint(a.meta_dir)
    spec = get_train_spec("llama3")
    args = llama_args_from_params(params, sd, a.meta_dir)
    check_fits(a.meta_dir, state_shapes(sd), expected_shapes(spec, args), what="Meta checkpoint",
               union_across_ranks=False, hint="; params.json and the weights disagree, or tensors are missing")
    dtype = parse_dtype(a.dtype)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model = ModelInfo(spec.name, spec.matching_flavor(args), args)
    write_model_checkpoint(sd, a.out_dir, marker_info(0, "converted", model, source=a.meta_dir, format="meta"))
    print(f"wrote {a.out_dir}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters; "
          f"model.flavor {model.flavor or '(none matches: add a flavor with these args)'}")
    return 0


if __name__ == "__main__":
    main_guard(main)
