#!/usr/bin/env python
"""Generate text from a checkpoint: our DCP step folder, a dcp_to_torch .pt, or an HF folder.

    python scripts/generate.py --config train_configs/debug_model.toml --checkpoint outputs/x/checkpoint/step-100 \\
        --prompt "The list type" [--max-new-tokens 32] [--temperature 0.8 --top-k 50 --top-p 0.9 --seed 0] [--json]
    python scripts/generate.py --flavor debugmodel --checkpoint out.pt --prompt-ids 1,2,3 --json

Greedy decoding by default (--temperature 0). Model args come from --config/--flavor,
else from the step folder's .complete marker or the HF folder's config.json. Runs in one
process on the CPU (or one GPU), recomputing the whole sequence per token: this is a
checkpoint sanity tool, not a server.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from _checkpoint_cli import ROOT, add_model_flags, main_guard, resolve_model

from torchtitan.checkpoint import CheckpointError, ModelInfo, ModelWrapper
from torchtitan.checkpoint.formats.hf import hf_native_shapes, load_hf_into_model, model_from_hf_config, read_hf_config
from torchtitan.checkpoint.io import (
    MARKER,
    check_fits,
    load_model_from_dcp,
    model_shapes,
    read_dcp_metadata,
    read_marker,
    state_shapes,
)
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import load_config
from torchtitan.models.common.adapter import StateDictAdapter
from torchtitan.tools.device import detect_device_type, local_device
from torchtitan.tools.errors import ConfigError

DEFAULT_TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator):
    """Next token id from the last position's logits (1-D)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop tokens once the mass before them already reaches top_p (the first is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def checkpoint_kind(path: str) -> str:
    if os.path.isfile(path):
        return "pt"
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    files = os.listdir(path)
    if ".metadata" in files:
        return "dcp"
    if any(f.endswith(".safetensors") for f in files):
        return "hf"
    raise CheckpointError(f"checkpoint {path} is neither a DCP folder (.metadata), an HF folder (*.safetensors) nor a "
                          ".pt file")


def model_for(a, kind: str) -> ModelInfo:
    """--config/--flavor if given, else what the checkpoint says about itself (HF config.json or our marker)."""
    if kind == "hf" and not (a.config or a.flavor):
        return model_from_hf_config(read_hf_config(a.checkpoint), a.checkpoint, a.model)
    marker = {}
    if kind == "dcp" and os.path.isfile(os.path.join(a.checkpoint, MARKER)):
        marker = read_marker(a.checkpoint)
    return resolve_model(a, marker, a.checkpoint)


def _read_pt(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({type(e).__name__}: {e})") from None
    # dcp_to_torch output nests the weights under "model"; Meta's consolidated.00.pth is flat.
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    return {k: v for k, v in sd.items() if k != "rope.freqs"}


def check_checkpoint_fits(model, path: str, kind: str, adapter: StateDictAdapter) -> None:
    """Shapes from headers/metadata against the model still on the meta device: a wrong flavor fails
    before gigabytes are allocated."""
    want = state_shapes(model.state_dict())
    if kind == "dcp":
        have, what = model_shapes(read_dcp_metadata(path)), "checkpoint"
    elif kind == "hf":
        have, what = hf_native_shapes(path, adapter), "HF checkpoint"
    else:
        have, what = state_shapes(_read_pt(path)), ".pt checkpoint"
    check_fits(path, have, want, what=what, union_across_ranks=False)


def load_weights(model, path: str, kind: str, adapter: StateDictAdapter) -> None:
    if kind == "dcp":
        load_model_from_dcp(path, model.state_dict())  # the state dict's tensors alias the parameters
    elif kind == "hf":
        load_hf_into_model(ModelWrapper([model]), adapter, path)
    else:
        model.load_state_dict(_read_pt(path), strict=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step folder, .pt file (dcp_to_torch or Meta), or HF folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (BOS is added)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, used as given")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--tokenizer", help="tokenizer path (default: the config's, else the bundled one)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the ids and text")
    add_model_flags(p)
    a = p.parse_args()

    kind = checkpoint_kind(a.checkpoint)
    info = model_for(a, kind)
    spec, args = info.spec, info.args
    tok_path = a.tokenizer
    if tok_path is None and a.config:
        tok_path = load_config(["--job.config_file", a.config], env={}).model.tokenizer_path or None
    tokenizer = build_tokenizer(tok_path or DEFAULT_TOKENIZER)
    ids = ([int(x) for x in a.prompt_ids.split(",") if x.strip()] if a.prompt_ids is not None
           else tokenizer.encode(a.prompt, bos=True, eos=False))
    if not ids or max(ids) >= args.vocab_size or min(ids) < 0:
        raise ConfigError(f"prompt ids must be non-empty and in [0, {args.vocab_size})")
    args.max_seq_len = max(args.max_seq_len, len(ids) + a.max_new_tokens)

    device = local_device(detect_device_type())
    model = spec.build_meta_model(args)
    adapter = spec.adapter(args)
    check_checkpoint_fits(model, a.checkpoint, kind, adapter)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)  # also builds the RoPE table, which checkpoints never hold
    load_weights(model, a.checkpoint, kind, adapter)
    model.eval()

    generator = torch.Generator(device=device).manual_seed(a.seed)
    out: list[int] = []
    seq = torch.tensor([ids], device=device)
    with torch.no_grad():
        for _ in range(a.max_new_tokens):
            nxt = sample_next(model(seq)[0, -1], a.temperature, a.top_k, a.top_p, generator)
            out.append(nxt)
            if nxt == tokenizer.eos_id and not a.ignore_eos:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]], device=device)], dim=1)
    text = tokenizer.decode(out)
    if a.json:
        print(json.dumps({"prompt_ids": ids, "generated_ids": out, "text": text}))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    main_guard(main)
