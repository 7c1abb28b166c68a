#!/usr/bin/env python
"""Hugging Face model (config.json + safetensors, single or sharded) -> a DCP step folder.

    python scripts/convert_hf_to_dcp.py HF_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16] [--model NAME]

Llama (model_type llama), OLMo and OLMo 2. Model args come from config.json; names and the q/k rotary permutation from the
model's state_dict_adapter. OUT_DIR holds {"model": ...} in plain DCP plus a
.complete marker (with the model args), usable as checkpoint.initial_load_path or
as step-0 of a run. (The trainer can also read HF folders directly:
checkpoint.initial_load_path = HF_DIR.)
"""
from __future__ import annotations

import argparse
import time

from _checkpoint_cli import DTYPE_CHOICES, main_guard, parse_dtype


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored)")
    p.add_argument("--model", default=None, help="train spec name (default: from config.json's model_type)")
    a = p.parse_args()

    from torchtitan.components.checkpoint_io import (
        check_fits, expected_shapes, model_args_to_dict, write_model_checkpoint)
    from torchtitan.components.hf_checkpoint import (
        hf_native_shapes, hf_to_native, model_from_hf_config, read_hf_config, read_hf_state_dict)

    cfg = read_hf_config(a.hf_dir)
    spec, args, flavor = model_from_hf_config(cfg, a.hf_dir, a.model)
    adapter = spec.state_dict_adapter(args)
    tied = bool(cfg.get("tie_word_embeddings", False))
    have = hf_native_shapes(a.hf_dir, adapter)
    check_fits(a.hf_dir, have, expected_shapes(args, spec.model_cls), what="HF checkpoint", union_across_ranks=False,
               hint="; config.json and the weights disagree, or tensors are missing")
    sd = hf_to_native(read_hf_state_dict(a.hf_dir, dtype=parse_dtype(a.dtype)), adapter, a.hf_dir, tied)
    info = {"step": 0, "kind": "converted", "source": a.hf_dir, "format": "hf", "model": spec.name, "time": time.time(),
            "world_size": 1, "model_args": model_args_to_dict(args)}
    write_model_checkpoint(sd, a.out_dir, info)
    print(f"wrote {a.out_dir}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters; "
          f"model.flavor {flavor or '(none matches: add a flavor with these args)'}"
          + ("; tied embeddings were untied (output.weight = a copy)" if tied and not args.tie_word_embeddings else ""))
    return 0


if __name__ == "__main__":
    main_guard(main)
