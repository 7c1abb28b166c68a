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

import torch
from _checkpoint_cli import add_model_flags, checkpoint_kind, load_model, main_guard, model_for, tokenizer_for

from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.tools.device import detect_device_type, local_device
from torchtitan.tools.errors import ConfigError


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
    p.add_argument("--tokenizer", help="tokenizer path (default: the HF folder's tokenizer.json, the one the "
                   "checkpoint's marker names, the config's, else the bundled one)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the ids and text")
    add_model_flags(p)
    a = p.parse_args()

    kind = checkpoint_kind(a.checkpoint)
    info = model_for(a, kind)
    args = info.args
    tokenizer = build_tokenizer(tokenizer_for(a, kind, info))
    ids = ([int(x) for x in a.prompt_ids.split(",") if x.strip()] if a.prompt_ids is not None
           else tokenizer.encode(a.prompt, bos=True, eos=False))
    if not ids or max(ids) >= args.vocab_size or min(ids) < 0:
        raise ConfigError(f"prompt ids must be non-empty and in [0, {args.vocab_size})")
    args.max_seq_len = max(args.max_seq_len, len(ids) + a.max_new_tokens)

    device = local_device(detect_device_type())
    model = load_model(a, kind, info, device)

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
