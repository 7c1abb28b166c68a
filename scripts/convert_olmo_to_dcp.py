"""Convert an unsharded OLMo trainer checkpoint (config.yaml + model.safetensors/model.pt) for this trainer.

    python scripts/convert_olmo_to_dcp.py OLMO_CKPT_DIR OUT_DCP_DIR [--trust-pickled-keys] [--hf-out HF_DIR]

OUT_DCP_DIR is a DCP checkpoint of the model weights; train from it with
`checkpoint.initial_load_path = OUT_DCP_DIR` and the printed model.name /
flavor (or model args matching the printed shape). --hf-out also writes a
transformers folder (model.safetensors + config.json) through the model's HF
adapter. --trust-pickled-keys is required for model.safetensors: OLMo encodes its
tensor names as pickles (see torchtitan/models/olmo_checkpoint.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def matching_flavor(family: str, args) -> str | None:
    from torchtitan.models import get_train_spec

    fields = [f.name for f in dataclasses.fields(args) if f.name not in ("max_seq_len", "sdpa_backend")]
    for name, flavor in get_train_spec(family).flavors.items():
        if all(getattr(flavor, f) == getattr(args, f) for f in fields):
            return name
    return None


def save_dcp(state_dict: dict, out_dir: str) -> None:
    """The layout CheckpointManager reads: a DCP folder whose model entries are prefixed "model."."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(out_dir, exist_ok=True)
    dcp.save({"model": state_dict}, checkpoint_id=out_dir, no_dist=True)


def save_hf(family: str, args, state_dict: dict, out_dir: str) -> None:
    from safetensors.torch import save_file

    from torchtitan.models import get_train_spec

    adapter = get_train_spec(family).state_dict_adapter(args)
    os.makedirs(out_dir, exist_ok=True)
    hf = {k: v.contiguous() for k, v in adapter.to_hf(state_dict).items()}
    save_file(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(adapter.hf_config(dtype=dtype), f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("olmo_dir")
    p.add_argument("out_dir")
    p.add_argument("--trust-pickled-keys", action="store_true",
                   help="allow decoding OLMo's pickled safetensors key names (only for checkpoints you trust)")
    p.add_argument("--hf-out", default=None, help="also write a transformers folder here")
    args = p.parse_args(argv)

    from torchtitan.models.olmo_checkpoint import OlmoCheckpointError, load_olmo_checkpoint

    try:
        ckpt = load_olmo_checkpoint(args.olmo_dir, trust_pickled_keys=args.trust_pickled_keys)
    except OlmoCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out_dir, ".metadata")):
        print(f"error: {args.out_dir} already holds a DCP checkpoint", file=sys.stderr)
        return 2
    save_dcp(ckpt.state_dict, args.out_dir)
    flavor = matching_flavor(ckpt.family, ckpt.args)
    a = ckpt.args
    print(f"{args.olmo_dir} -> {args.out_dir}: model.name = {ckpt.family!r}, "
          f"model.flavor = {flavor!r}" if flavor else
          f"{args.olmo_dir} -> {args.out_dir}: model.name = {ckpt.family!r}, no built-in flavor matches; add one with "
          f"{a}")
    print(f"shape: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.kv_heads} kv), ffn {a.ffn_hidden_dim}, "
          f"vocab {a.vocab_size}, rope_theta {a.rope_theta}, tied {a.tie_word_embeddings}")
    if args.hf_out:
        save_hf(ckpt.family, ckpt.args, ckpt.state_dict, args.hf_out)
        print(f"HF transformers folder written to {args.hf_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
