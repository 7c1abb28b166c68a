"""Run a Hugging Face byte-level BPE ``tokenizer.json`` on tiktoken's encoder when that gives the same ids.

On one core HF ``tokenizers`` spends much of each call on bookkeeping the data path never reads (offsets,
``Encoding`` objects); tiktoken runs a byte-level BPE about 3x faster. The two algorithms are not the same in
general: tiktoken merges any adjacent pair whose concatenation is a token (lowest id first) and returns a
pre-token that is itself a token whole, while HF applies only the listed merges, in list order. So the
tiktoken engine is built only when the file's structure lines up with tiktoken's model (no normalizer, the
plain byte-level pre-tokenizer or one regex split, merges listed in the order of their results' ids, only
special added tokens) and both engines then give the same ids for every token of the vocabulary and a fixed
multilingual sample. Anything else keeps HF, and the reason is returned for the log.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["GPT2_PATTERN", "byte_decoder", "tiktoken_encoding"]

# The regex that HF's ByteLevel pre-tokenizer applies when use_regex is true (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text both engines must agree on before the fast one is used: scripts, digits, code, whitespace runs,
# contractions and the special-token strings that must stay plain text.
_SAMPLE = (
    "Hello world! It's 2026; we'll see. 12345678 x=3.14e-2\n\n\tdef f(a, b):\n        return a**b  # ok\r\n"
    "Ünïcödé façade naïve — “quotes” ‘single’ … Straße ΑΒΓ αβγ Привет мир 你好，世界 こんにちは 안녕하세요 "
    "مرحبا שלום नमस्ते 🙂👍🏽 <|begin_of_text|><|end_of_text|><|endoftext|>   trailing   \n"
)


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (what byte-level vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _pattern(pre: dict[str, Any] | None) -> str | None:
    """The single regex the pre-tokenizer applies, or None when tiktoken cannot express it."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
        return GPT2_PATTERN if ok else None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) != 2:
            return None
        split, level = steps
        if (level.get("type") != "ByteLevel" or level.get("use_regex", True) or level.get("add_prefix_space", False)
                or split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert", False)):
            return None
        return split.get("pattern", {}).get("Regex")
    return None


def _pipeline_misfit(spec: dict[str, Any], model: dict[str, Any]) -> str | None:
    """Why the file's pipeline around the BPE model is not tiktoken's (None: it is)."""
    if model.get("type") != "BPE":
        return f"model type {model.get('type')} is not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "BPE options (dropout, subword prefix/suffix, byte fallback) tiktoken does not have"
    if spec.get("normalizer") is not None:
        return "a normalizer, which tiktoken does not run"
    if _pattern(spec.get("pre_tokenizer")) is None:
        return "a pre-tokenizer other than byte-level with one regex"
    if any(not t.get("special", False) for t in spec.get("added_tokens", [])):
        return "non-special added tokens, which tokenizers matches inside text and tiktoken would not"
    return None


def _structure(spec: dict[str, Any]) -> tuple[str, dict[bytes, int]] | str:
    """(pattern, ranks) when the file fits tiktoken's model, else the reason it does not."""
    model = spec.get("model") or {}
    misfit = _pipeline_misfit(spec, model)
    if misfit is not None:
        return misfit
    pattern = _pattern(spec.get("pre_tokenizer"))
    decode = byte_decoder()
    vocab: dict[str, int] = model.get("vocab", {})

    def as_bytes(token: str) -> bytes | None:
        try:
            return bytes(decode[ch] for ch in token)
        except KeyError:
            return None

    ranks: dict[bytes, int] = {}
    for ch, b in decode.items():
        if ch not in vocab:
            return f"byte {b} has no token"
        ranks[bytes([b])] = vocab[ch]
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        tid = vocab.get(token)
        raw = as_bytes(token)
        if tid is None or raw is None:
            return f"merge {left!r} + {right!r} makes no byte-level token"
        # tiktoken ranks a pair by the id of its result, so merge order must be id order. Several merges
        # of one token (files converted from tiktoken list every split) sit next to each other.
        if tid < last:
            return f"merge {left!r} + {right!r} (id {tid}) is out of id order"
        last = tid
        ranks[raw] = tid
    return pattern, ranks


def tiktoken_encoding(path: str, hf_tokenizer: Any) -> tuple[Any | None, str]:
    """(tiktoken.Encoding, "") when it reproduces ``hf_tokenizer`` on this file, else (None, why not)."""
    import tiktoken

    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    found = _structure(spec)
    if isinstance(found, str):
        return None, found
    pattern, ranks = found
    try:
        enc = tiktoken.Encoding(name=f"hf-bpe:{path}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:  # a regex tiktoken's engine rejects
        return None, f"tiktoken cannot build it ({e})"
    texts = [_SAMPLE]
    for raw in ranks:
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a partial UTF-8 sequence never appears alone in text
    expected = [e.ids for e in hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, ids in zip(texts, expected):
        if enc.encode_ordinary(text) != ids:
            return None, f"tiktoken and tokenizers disagree on {text[:40]!r}"
    return enc, ""
