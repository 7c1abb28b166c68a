"""The tiktoken engine for HF byte-level BPE files: same ids as the tokenizers library, or not used at all."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from torchtitan.components.bpe_tiktoken import byte_decoder, tiktoken_encoding
from torchtitan.components.tokenizer import LLAMA3_PATTERN, HFTokenizer, TikTokenTokenizer, build_tokenizer
from torchtitan.datasets.text import pydoc_documents

ASSET = Path(__file__).resolve().parents[3] / "torchtitan" / "assets" / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def engines() -> tuple[HFTokenizer, HFTokenizer]:
    fast, slow = HFTokenizer(ASSET, "auto"), HFTokenizer(ASSET, "tokenizers")
    assert (fast.backend, slow.backend) == ("tiktoken", "tokenizers")
    return fast, slow


def _fuzz_texts(vocab: list[str], n: int, seed: int = 0) -> list[str]:
    """Concatenations of vocabulary strings, odd characters and whitespace runs: where merge orders bite."""
    rng = random.Random(seed)
    odd = ["\n", "\r\n", "\t", "  ", "   ", "'s", "'LL", "0", "12345", "é", "ß", "中文", "🙂", "\u200b", "--", "..."]
    out = []
    for _ in range(n):
        parts = [rng.choice(vocab) if rng.random() < 0.7 else rng.choice(odd) for _ in range(rng.randint(1, 12))]
        out.append("".join(parts))
    return out


def test_bundled_tokenizer_same_ids_on_corpus_and_fuzz(engines) -> None:
    fast, slow = engines
    decode = byte_decoder()
    vocab = []
    for token in json.loads(ASSET.read_text())["model"]["vocab"]:
        try:
            vocab.append(bytes(decode[c] for c in token).decode("utf-8"))
        except (KeyError, UnicodeDecodeError):
            continue
    texts = pydoc_documents() + _fuzz_texts(vocab, 3000)
    got = fast.encode_batch(texts, bos=True, eos=True)
    want = slow.encode_batch(texts, bos=True, eos=True)
    bad = [t[:60] for t, a, b in zip(texts, got, want) if a != b]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]}"
    assert sum(map(len, got)) > 100_000  # the corpus really was encoded


def test_texts_tiktoken_would_cut_go_to_tokenizers_whole(engines) -> None:
    fast, slow = engines
    long_doc = "word " * 90_000  # 450k chars: past tiktoken's limit
    long_run = "a b " + "x" * 30_000 + " c"
    for text in (long_doc, long_run):
        assert fast.encode(text, bos=False, eos=False) == slow.encode(text, bos=False, eos=False)


def _spec() -> dict:
    return json.loads(ASSET.read_text())


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": 2048, "content": "<x>", "special": False}),
         "non-special added tokens"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
        (lambda s: s["model"]["merges"].insert(0, s["model"]["merges"].pop(40)), "out of id order"),
    ],
)
def test_files_tiktoken_cannot_reproduce_stay_on_tokenizers(tmp_path: Path, edit, reason: str) -> None:
    from tokenizers import Tokenizer as RawTokenizer

    spec = _spec()
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    enc, why = tiktoken_encoding(str(path), RawTokenizer.from_file(str(path)))
    assert enc is None and reason in why
    assert HFTokenizer(path).backend == "tokenizers"


def test_converted_tiktoken_file_runs_on_tiktoken_with_its_ids(tmp_path: Path) -> None:
    """A tiktoken vocabulary written as HF tokenizer.json (regex split, every split listed) keeps tiktoken's ids."""
    import base64

    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    merged = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
    ranks = [bytes([b]) for b in range(256)] + merged
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                      for i, t in enumerate(ranks)))
    encode = {b: c for c, b in byte_decoder().items()}
    as_text = lambda raw: "".join(encode[b] for b in raw)  # noqa: E731
    vocab = {as_text(t): i for i, t in enumerate(ranks)}
    merges = []
    for t in merged:  # every split into two tokens of lower rank, in the order of the result's rank
        merges += [(as_text(t[:k]), as_text(t[k:])) for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks]
    raw = RawTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|end_of_text|>"])
    raw.save(str(tmp_path / "tokenizer.json"))

    fast = build_tokenizer(str(tmp_path / "tokenizer.json"))
    slow = build_tokenizer(str(tmp_path / "tokenizer.json"), "tokenizers")
    meta = TikTokenTokenizer(tmp_path / "tokenizer.model")
    assert fast.backend == "tiktoken"
    for text in ["hello world", "Hello, hello  world!\n\nworlds 123456 héllo", "<|end_of_text|> hello"]:
        ids = fast.encode(text, bos=False, eos=False)
        assert ids == slow.encode(text, bos=False, eos=False) == meta.encode(text, bos=False, eos=False)
        assert fast.decode(ids) == text


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer backend 'fast' is not one of auto, tokenizers"):
        build_tokenizer(str(ASSET), "fast")
