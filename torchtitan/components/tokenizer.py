"""Tokenizers behind one small interface, so data loading never cares about file formats.

Three formats are supported: Llama 3 tiktoken ``tokenizer.model`` files, Llama 2
SentencePiece ``.model`` files and Hugging Face ``tokenizer.json`` files. BOS/EOS are
always added by us (never by a library post-processor) so that every format behaves
the same way when the data pipeline asks for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtitan.components.bpe_tiktoken import tiktoken_encoding
from torchtitan.tools.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "Tokenizer",
    "TikTokenTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "TOKENIZER_BACKENDS",
    "check_vocab_fits",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
]


class Tokenizer(ABC):
    """Common interface; ``encode_batch`` exists so fast backends can parallelise."""

    @abstractmethod
    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``; special-token strings inside it are plain text."""

    def encode_batch(
        self, texts: list[str], *, bos: bool, eos: bool
    ) -> list[list[int]]:
        """Encode many texts; subclasses override when the backend has a batch path."""
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens are rendered, not dropped)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Largest id the tokenizer can emit, plus one (special tokens included)."""

    # Special ids, set by each subclass from its files.
    _bos: int | None = None
    _eos: int
    _pad: int | None = None

    @property
    def bos_id(self) -> int | None:
        """None when the vocabulary has no BOS token (e.g. OLMo)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Document separator; every supported tokenizer must have one."""
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        # A missing BOS is silently skipped: models trained without one expect none.
        bos_id = self.bos_id
        if bos and bos_id is not None:
            ids = [bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids


# --------------------------------------------------------------------------- tiktoken

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_NUM_SPECIAL = 256
# Meta's order matters: released checkpoints hard-code these ids.
LLAMA3_SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, _LLAMA3_NUM_SPECIAL - 5)]

# tiktoken raises on inputs above ~400k chars and its regex goes quadratic on very long
# runs without whitespace, so text is fed to it in bounded pieces.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
_RUNS = re.compile(r"\s+|\S+")
# Anchored at the start of a run, so the scan stays linear even inside a long run.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_TIKTOKEN_MAX_RUN + 1}}}|(?<!\s)\s{{{_TIKTOKEN_MAX_RUN + 1}}}")


def _tiktoken_pieces(text: str) -> Iterator[str]:
    """Split ``text`` into pieces of at most 400k chars with no run over 25k chars.

    Short texts pass through whole so their tokenization is exactly tiktoken's.
    Long ones are only cut between whitespace/non-whitespace runs (or inside
    pathological runs), which keeps the result close to an uncut encoding.
    """
    if len(text) <= _TIKTOKEN_MAX_CHARS and not _has_long_run(text):
        yield text
        return
    buf: list[str] = []
    size = 0
    for m in _RUNS.finditer(text):
        run = m.group()
        for start in range(0, len(run), _TIKTOKEN_MAX_RUN):
            part = run[start : start + _TIKTOKEN_MAX_RUN]
            if size + len(part) > _TIKTOKEN_MAX_CHARS or len(run) > _TIKTOKEN_MAX_RUN:
                if buf:
                    yield "".join(buf)
                buf, size = [], 0
            buf.append(part)
            size += len(part)
    if buf:
        yield "".join(buf)


def _has_long_run(text: str) -> bool:
    return len(text) > _TIKTOKEN_MAX_RUN and _LONG_RUN.search(text) is not None


def _load_ranks(path: str) -> dict[bytes, int]:
    """Read a ranks file without tiktoken's cache.

    tiktoken caches every file it loads under a key derived from the path string alone,
    so an edited or replaced local file (or another file at the same relative path)
    would silently load stale ranks. Caching only pays off for URLs.
    """
    from tiktoken.load import load_tiktoken_bpe

    if "://" in path:
        return load_tiktoken_bpe(path)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # empty string disables the cache
    try:
        return load_tiktoken_bpe(path)
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


class TikTokenTokenizer(Tokenizer):
    """Llama 3 ``tokenizer.model``: base64 BPE ranks plus Meta's 256 special tokens."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import tiktoken

        self.path = str(path)
        ranks = _load_ranks(self.path)
        n_base = len(ranks)
        specials = {tok: n_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._model = tiktoken.Encoding(
            name=Path(self.path).name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.special_tokens = specials
        self._bos = specials["<|begin_of_text|>"]
        self._eos = specials["<|end_of_text|>"]

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        ids: list[int] = []
        for piece in _tiktoken_pieces(text):
            # Ordinary encoding: "<|eot_id|>" in raw web text must not become a control token.
            ids.extend(self._model.encode_ordinary(piece))
        return self._wrap(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._model.n_vocab



# ----------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 style SentencePiece ``.model``; special ids come from the model itself."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        self.path = str(path)
        self._model = spm.SentencePieceProcessor(model_file=self.path)
        eos = self._model.eos_id()
        if eos < 0:
            raise ConfigError(f"sentencepiece model {self.path} defines no EOS token")
        self._eos = eos
        self._bos = _none_if_negative(self._model.bos_id())
        self._pad = _none_if_negative(self._model.pad_id())

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return self._wrap(self._model.encode(text), bos, eos)

    def encode_batch(
        self, texts: list[str], *, bos: bool, eos: bool
    ) -> list[list[int]]:
        batch: list[list[int]] = self._model.encode(list(texts))
        return [self._wrap(ids, bos, eos) for ids in batch]

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._model.get_piece_size()


def _none_if_negative(i: int) -> int | None:
    # SentencePiece reports an absent special token as -1.
    return i if i >= 0 else None


# -------------------------------------------------------------------------- HF json

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
# "<|endoftext|>" is only an EOS: GPT-2/OLMo vocabularies have no separate BOS.
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<pad>", "<|padding|>", "<|pad|>")


TOKENIZER_BACKENDS = ("auto", "tokenizers")


class HFTokenizer(Tokenizer):
    """Hugging Face ``tokenizer.json``; specials from a sibling ``tokenizer_config.json``.

    With backend "auto", byte-level BPE files that tiktoken reproduces exactly are encoded by tiktoken
    (about 3x faster on one core, see bpe_tiktoken.py); "tokenizers" always uses the HF library.
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto") -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self.path = str(path)
        self._model = RawTokenizer.from_file(self.path)
        # Like tiktoken's encode_ordinary: a literal "<|endoftext|>" in crawled text
        # must stay text, or documents could forge their own boundaries.
        self._model.encode_special_tokens = True
        vocab = self._model.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        config = _read_config(Path(self.path).with_name("tokenizer_config.json"))
        self._bos = self._special_id(config, "bos_token", _BOS_NAMES)
        eos = self._special_id(config, "eos_token", _EOS_NAMES)
        if eos is None:
            raise ConfigError(
                f"tokenizer {self.path} has no EOS token: set eos_token in "
                f"tokenizer_config.json or use one of {', '.join(_EOS_NAMES)}"
            )
        self._eos = eos
        self._pad = self._special_id(config, "pad_token", _PAD_NAMES)
        # Batch encoding without offsets is noticeably faster; older releases lack it.
        self._batch = getattr(self._model, "encode_batch_fast", self._model.encode_batch)
        if backend not in TOKENIZER_BACKENDS:
            raise ConfigError(f"tokenizer backend {backend!r} is not one of {', '.join(TOKENIZER_BACKENDS)}")
        self._fast = None
        if backend == "auto":
            self._fast, why = tiktoken_encoding(self.path, self._model)
            if self._fast is None:
                logger.info("tokenizer %s: encoding with tokenizers, not tiktoken: %s", self.path, why)

    def _special_id(
        self, config: dict[str, Any] | None, key: str, names: tuple[str, ...]
    ) -> int | None:
        if config is not None and key in config:
            # An explicit null in the config means "none", not "guess".
            token = _token_content(config[key])
            if token is None:
                return None
            tid = self._model.token_to_id(token)
            if tid is None:
                raise ConfigError(
                    f"tokenizer {self.path}: {key} {token!r} from tokenizer_config.json "
                    "is not in the vocabulary"
                )
            return tid
        for name in names:
            tid = self._model.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @property
    def backend(self) -> str:
        return "tiktoken" if self._fast is not None else "tokenizers"

    def _fast_ok(self, text: str) -> bool:
        # Texts tiktoken would need cut into pieces go to tokenizers whole, so ids never depend on the engine.
        return self._fast is not None and len(text) <= _TIKTOKEN_MAX_CHARS and not _has_long_run(text)

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if self._fast_ok(text):
            ids = self._fast.encode_ordinary(text)
        else:
            ids = self._model.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: list[str], *, bos: bool, eos: bool
    ) -> list[list[int]]:
        if self._fast is not None:
            return [self.encode(t, bos=bos, eos=eos) for t in texts]
        encodings = self._batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _token_content(value: object) -> str | None:
    # transformers writes special tokens either as strings or as AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"unrecognized special token entry {value!r}")


# ---------------------------------------------------------------------------- factory

_ACCEPTED = (
    "a directory with tokenizer.json or tokenizer.model, a HF tokenizer.json, "
    "a SentencePiece .model or a tiktoken tokenizer.model"
)


def build_tokenizer(path: str, backend: str = "auto") -> Tokenizer:
    """Pick the tokenizer class from what is on disk, so configs only name a path.

    ``backend`` only matters for HF tokenizer.json files (see HFTokenizer).
    """
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return build_tokenizer(str(p / name), backend)
        raise ConfigError(f"tokenizer directory {path} has no tokenizer file; expected {_ACCEPTED}")
    if not p.is_file():
        raise ConfigError(f"tokenizer path {path} does not exist; expected {_ACCEPTED}")
    if p.suffix == ".json":
        return HFTokenizer(p, backend)
    # Both Llama 2 and Llama 3 ship "tokenizer.model"; only the content tells them apart.
    try:
        return SentencePieceTokenizer(p)
    except Exception:
        pass
    try:
        return TikTokenTokenizer(p)
    except Exception:
        pass
    raise ConfigError(f"tokenizer file {path} is not a recognized format; expected {_ACCEPTED}")


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int, path: str) -> None:
    """Fail early: an out-of-range id would otherwise crash deep inside the embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"tokenizer {path} has ids up to {tokenizer.vocab_size - 1} but "
            f"model.vocab_size is {model_vocab_size}; set model.vocab_size to at least "
            f"{tokenizer.vocab_size} or use a tokenizer that matches the model"
        )
