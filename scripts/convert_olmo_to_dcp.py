#!/usr/bin/env python
"""Convert an unsharded OLMo trainer checkpoint (config.yaml + model.safetensors/model.pt) for this trainer.

    python scripts/convert_olmo_to_dcp.py OLMO_CKPT_DIR OUT_DCP_DIR [--trust-pickled-keys] [--hf-out HF_DIR]

OUT_DCP_DIR is a DCP step folder of the model weights with a .complete marker that
records the family (olmo or olmo2), the matching flavor and the model args; train
from it with `checkpoint.initial_load_path = OUT_DCP_DIR` and the printed
model.name / flavor. --hf-out also writes a transformers folder (safetensors +
config.json) through the family's HF adapter. --trust-pickled-keys is required for
model.safetensors: OLMo encodes its tensor names as pickles (see
torchtitan/checkpoint/formats/olmo.py).
"""
from __future__ import annotations

import argparse

from _checkpoint_cli import main_guard

from torchtitan.checkpoint.formats.hf import write_hf_folder
from torchtitan.checkpoint.formats.olmo import load_olmo_checkpoint
from torchtitan.checkpoint.io import ModelInfo, ensure_new_output, marker_info, write_model_checkpoint
from torchtitan.models import get_train_spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("olmo_dir")
    p.add_argument("out_dir")
    p.add_argument("--trust-pickled-keys", action="store_true",
                   help="allow decoding OLMo's pickled safetensors key names (only for checkpoints you trust)")
    p.add_argument("--hf-out", default=None, help="also write a transformers folder here")
    args = p.parse_args(argv)

    ensure_new_output(args.out_dir)
    if args.hf_out:
        ensure_new_output(args.hf_out)
    ckpt = load_olmo_checkpoint(args.olmo_dir, trust_pickled_keys=args.trust_pickled_keys)
    spec = get_train_spec(ckpt.family)
    model = ModelInfo(spec.name, spec.matching_flavor(ckpt.args), ckpt.args)
    write_model_checkpoint(ckpt.state_dict, args.out_dir,
                           marker_info(0, "converted", model, source=args.olmo_dir, format="olmo"))
    a = ckpt.args
    print(f"{args.olmo_dir} -> {args.out_dir}: model.name = {model.name!r}, model.flavor = {model.flavor!r}"
          if model.flavor else
          f"{args.olmo_dir} -> {args.out_dir}: model.name = {model.name!r}, no built-in flavor matches; add one with "
          f"{a}")
    print(f"shape: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.kv_heads} kv), ffn {a.ffn_hidden_dim}, "
          f"vocab {a.vocab_size}, rope_theta {a.rope_theta}, tied {a.tie_word_embeddings}")
    if args.hf_out:
        write_hf_folder(ckpt.state_dict, spec.adapter(ckpt.args), args.hf_out)
        print(f"HF transformers folder written to {args.hf_out}")
    return 0


if __name__ == "__main__":
    main_guard(main)
