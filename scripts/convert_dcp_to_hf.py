#!/usr/bin/env python
"""A DCP checkpoint (a training step folder, export, seed or converted folder) -> Hugging Face format.

    python scripts/convert_dcp_to_hf.py STEP_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16]
        [--num-shards N] [--config TOML | --flavor NAME [--vocab-size V]]

Writes model-0000i-of-0000N.safetensors, model.safetensors.index.json and config.json,
loadable with transformers' AutoModelForCausalLM.from_pretrained(OUT_DIR). Model args come
from --config/--flavor, else from the model_args that our .complete markers record.
Only the "model" entry is read; optimizer and data state are ignored.
"""
from __future__ import annotations

import argparse
import json
import os

from _checkpoint_cli import DTYPE_CHOICES, add_model_flags, main_guard, parse_dtype, resolve_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dcp_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored)")
    p.add_argument("--num-shards", type=int, default=1, help="number of safetensors files")
    add_model_flags(p)
    a = p.parse_args()

    from torchtitan.components.checkpoint_io import (
        MARKER, check_fits, ensure_new_output, expected_shapes, read_marker, read_model_from_dcp, staged_output, state_shapes)
    from torchtitan.components.hf_checkpoint import CONFIG_FILE, hf_config_for, native_to_hf, write_hf_state_dict

    ensure_new_output(a.out_dir)
    marker = read_marker(a.dcp_dir) if os.path.isfile(os.path.join(a.dcp_dir, MARKER)) else {}
    spec, args = resolve_model(a, marker)
    if spec.state_dict_adapter is None:
        raise ValueError(f"model {spec.name} has no state_dict_adapter: no HF names to write")
    sd, _ = read_model_from_dcp(a.dcp_dir)
    check_fits(a.dcp_dir, state_shapes(sd), expected_shapes(args, spec.model_cls),
               union_across_ranks=False)
    dtype = parse_dtype(a.dtype)
    adapter = spec.state_dict_adapter(args)
    hf_sd = native_to_hf(sd, adapter, dtype)
    out_dtype = dtype or next(iter(hf_sd.values())).dtype
    with staged_output(a.out_dir) as tmp:
        write_hf_state_dict(hf_sd, tmp, a.num_shards)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_config_for(adapter, args, out_dtype), f, indent=2)
    print(f"wrote {a.out_dir}: {len(hf_sd)} tensors in {a.num_shards} safetensors file(s), dtype {out_dtype}")
    return 0


if __name__ == "__main__":
    main_guard(main)
