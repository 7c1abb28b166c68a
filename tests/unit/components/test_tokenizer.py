"""Tokenizer formats, special ids, format detection and error messages."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from torchtitan.components.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    TikTokenTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_fits,
)

ASSET_DIR = Path(__file__).resolve().parents[3] / "torchtitan" / "assets" / "tokenizer"
SAMPLES = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n\n",
    "ünïcödé and emoji 😀, tabs\tand  double  spaces",
    "literal <|end_of_text|> and <|begin_of_text|> stay text",
    "",
]

# Ranks: every single byte, then merges that spell "hello" (260 base tokens).
_MERGES = [b"he", b"ll", b"llo", b"hello"]


def _write_tiktoken(path: Path) -> Path:
    tokens = [bytes([b]) for b in range(256)] + _MERGES
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


_SPM_ALPHABET = set("abcdefghijklmnopqrstuvwxyz0123456789 .,()\n")
SPM_SAMPLES = ["hello world.", "f(x) returns 42, twice", "  leading  and double spaces"]


def _train_sentencepiece(path_prefix: Path) -> Path:
    from pydoc_data.topics import topics

    import sentencepiece as spm

    # A ~40-symbol alphabet leaves room for merges inside a 100-piece vocabulary.
    text = "\n".join(topics[k] for k in sorted(topics)[:10]).lower()
    text = "".join(c for c in text if c in _SPM_ALPHABET)
    corpus = path_prefix.with_suffix(".txt")
    corpus.write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path_prefix),
        vocab_size=100,
        model_type="bpe",
        character_coverage=1.0,
        # Keep text as-is so decode(encode(s)) == s for the samples.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return path_prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("spm") / "sp")


@pytest.fixture
def tiktoken_path(tmp_path: Path) -> Path:
    return _write_tiktoken(tmp_path / "tokenizer.model")


def _assert_round_trip(tok: Tokenizer, samples: list[str] = SAMPLES) -> None:
    for s in samples:
        ids = tok.encode(s, bos=False, eos=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    batch = tok.encode_batch(samples, bos=True, eos=True)
    assert batch == [tok.encode(s, bos=True, eos=True) for s in samples]


# ------------------------------------------------------------------ debug asset (HF)


def test_debug_asset_round_trip_and_specials() -> None:
    tok = build_tokenizer(str(ASSET_DIR))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    _assert_round_trip(tok)
    ids = tok.encode("Hello", bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1
    assert tok.encode("Hello", bos=False, eos=False) == ids[1:-1]


def test_debug_asset_special_strings_are_plain_text() -> None:
    tok = build_tokenizer(str(ASSET_DIR))
    ids = tok.encode("a<|end_of_text|>b", bos=False, eos=False)
    assert tok.eos_id not in ids


def test_hf_eos_only_like_olmo(tmp_path: Path) -> None:
    """No BOS in vocab or config: bos_id is None and bos=True adds nothing."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(["<|endoftext|>", "<|padding|>"])
    raw.save(str(tmp_path / "tokenizer.json"))

    tok = build_tokenizer(str(tmp_path))
    assert tok.bos_id is None
    assert tok.eos_id == 26 and tok.pad_id == 27
    assert tok.encode("abc", bos=True, eos=True) == [0, 1, 2, 26]

    # A config with dict-style entries and an explicit null BOS wins over name guessing.
    config = {
        "bos_token": None,
        "eos_token": {"content": "<|padding|>", "special": True},
        "pad_token": "<|endoftext|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 27, 26)


# --------------------------------------------------------------------------- tiktoken


def test_tiktoken_specials_and_round_trip(tiktoken_path: Path) -> None:
    tok = TikTokenTokenizer(tiktoken_path)
    n_base = 256 + len(_MERGES)
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.vocab_size == n_base + 256
    assert tok.bos_id == n_base
    assert tok.eos_id == n_base + 1
    assert tok.special_tokens["<|start_header_id|>"] == n_base + 6
    assert tok.special_tokens["<|eot_id|>"] == n_base + 9
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n_base + 255
    assert tok.encode("hello", bos=True, eos=True) == [n_base, 259, n_base + 1]
    _assert_round_trip(tok)


def test_tiktoken_long_input(tiktoken_path: Path) -> None:
    tok = TikTokenTokenizer(tiktoken_path)
    # Past tiktoken's 400k-char limit and with a 30k run that has no whitespace.
    text = "hello world " * 40_000 + "x" * 30_000
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def test_tiktoken_file_is_not_cached_by_path(tmp_path: Path) -> None:
    path = _write_tiktoken(tmp_path / "tokenizer.model")
    assert TikTokenTokenizer(path).vocab_size == 260 + 256
    lines = path.read_text().splitlines()[:-1]  # drop the "hello" merge
    path.write_text("\n".join(lines) + "\n")
    assert TikTokenTokenizer(path).vocab_size == 259 + 256


# ---------------------------------------------------------------------- sentencepiece


def test_sentencepiece_specials_and_round_trip(spm_path: Path) -> None:
    tok = SentencePieceTokenizer(spm_path)
    assert tok.vocab_size == 100
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    _assert_round_trip(tok, SPM_SAMPLES)


# -------------------------------------------------------------------- build_tokenizer


def test_build_tokenizer_picks_type_by_file(
    tmp_path: Path, spm_path: Path, tiktoken_path: Path
) -> None:
    assert isinstance(build_tokenizer(str(ASSET_DIR / "tokenizer.json")), HFTokenizer)
    assert isinstance(build_tokenizer(str(spm_path)), SentencePieceTokenizer)
    assert isinstance(build_tokenizer(str(tiktoken_path)), TikTokenTokenizer)
    # Directories holding only tokenizer.model: the content decides the format.
    assert isinstance(build_tokenizer(str(tiktoken_path.parent)), TikTokenTokenizer)
    spm_dir = tmp_path / "llama2"
    spm_dir.mkdir()
    (spm_dir / "tokenizer.model").write_bytes(spm_path.read_bytes())
    assert isinstance(build_tokenizer(str(spm_dir)), SentencePieceTokenizer)


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "garbage"])
def test_build_tokenizer_errors_name_the_path(tmp_path: Path, kind: str) -> None:
    if kind == "missing":
        path = tmp_path / "nope.model"
    elif kind == "empty_dir":
        path = tmp_path
    else:
        path = tmp_path / "junk.model"
        path.write_bytes(b"\x00\xffnot a tokenizer\n")
    with pytest.raises(ValueError) as err:
        build_tokenizer(str(path))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_check_vocab_fits() -> None:
    tok = build_tokenizer(str(ASSET_DIR))
    check_vocab_fits(tok, 2048, str(ASSET_DIR))
    with pytest.raises(ValueError, match="model.vocab_size is 1000") as err:
        check_vocab_fits(tok, 1000, str(ASSET_DIR))
    assert str(ASSET_DIR) in str(err.value)
    assert "ids up to 2047" in str(err.value)
