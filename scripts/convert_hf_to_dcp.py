#!/usr/bin/env python
"""Hugging Face model (config.json + safetensors, single or sharded) -> a DCP step folder.

    python scripts/convert_hf_to_dcp.py HF_DIR OUT_DIR [--dtype keep|float32|bfloat16|float16] [--model NAME]

Llama (model_type llama), OLMo, OLMo 2, OLMo 3 and OLMoE: the family comes from
config.json's model_type, the model args from the rest of it, names, the q/k rotary
permutation and the stacking of per-expert tensors from the family's adapter. OUT_DIR holds {"model": ...} in plain DCP
plus a .complete marker (family, flavor, model args, and the HF folder's tokenizer.json when it has one), usable as
checkpoint.initial_load_path or as step-0 of a run. (The trainer can also read HF
folders directly: checkpoint.initial_load_path = HF_DIR.)
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from _checkpoint_cli import DTYPE_CHOICES, main_guard, parse_dtype

from torchtitan.checkpoint.formats.hf import (
    hf_native_shapes,
    hf_tied,
    model_from_hf_config,
    read_hf_as_native,
    read_hf_config,
)
from torchtitan.checkpoint.io import check_fits, expected_shapes, marker_info, write_model_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (keep: as stored)")
    p.add_argument("--model", default=None, help="train spec name (default: from config.json's model_type)")
    a = p.parse_args()

    model = model_from_hf_config(read_hf_config(a.hf_dir), a.hf_dir, a.model)
    tokenizer = os.path.join(os.path.abspath(a.hf_dir), "tokenizer.json")
    if os.path.isfile(tokenizer):  # the marker names it: scripts/evaluate.py and generate.py find it there
        model = dataclasses.replace(model, tokenizer=tokenizer)
    adapter = model.spec.adapter(model.args)
    check_fits(a.hf_dir, hf_native_shapes(a.hf_dir, adapter), expected_shapes(model.spec, model.args),
               what="HF checkpoint", union_across_ranks=False,
               hint="; config.json and the weights disagree, or tensors are missing")
    sd = read_hf_as_native(a.hf_dir, adapter, dtype=parse_dtype(a.dtype))
    write_model_checkpoint(sd, a.out_dir, marker_info(0, "converted", model, source=a.hf_dir, format="hf"))
    untied = hf_tied(a.hf_dir) and not model.args.tie_word_embeddings
    print(f"wrote {a.out_dir}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters; "
          f"model.name {model.name}, model.flavor {model.flavor or '(none matches: add a flavor with these args)'}"
          + ("; tied embeddings were untied (output.weight = a copy)" if untied else ""))
    return 0


if __name__ == "__main__":
    main_guard(main)
