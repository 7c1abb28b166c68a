"""Tokenize instruction / chat data into token ids plus a label mask for supervised fine-tuning (OLMo's layout).

    python scripts/prepare_sft_data.py --source chats.jsonl --out-dir data/sft
    python scripts/prepare_sft_data.py --source allenai/tulu-v2-sft-mixture --tokenizer path/to/tokenizer \\
        --out-dir data/tulu --max-seq-len 2048

Output, as OLMo's scripts/prepare_tulu_data.py writes it: `<out-dir>/input_ids.npy`, a raw headerless token
array (--dtype: uint16 when the vocabulary fits, else uint32), and `<out-dir>/label_mask.npy`, one bool byte
per token (False: the token is never a label). Every example fills exactly --max-seq-len tokens, so with
training.seq_len = --max-seq-len each memmap instance holds one example and no instance crosses two. A small
`prepare_info.json` holds the counts and the lines to train on the files.

Input (--source): a local .jsonl, .jsonl.gz, .json (a JSON array or JSON lines) file, or a Hugging Face hub
dataset name, streamed with `datasets` (--split). Each record is one of
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   (multi-turn)
  {"prompt": "...", "response": "..."}
  {"instruction": "...", "input": "..." (optional), "output": "..."}                 (Alpaca)
A prompt/response or instruction/output record is one user turn and one assistant turn (an Alpaca `input`
follows the instruction after a blank line). Turns after the last assistant turn are left out.

Rendering. When the tokenizer folder has a chat template (`chat_template` in tokenizer_config.json, or a
chat_template.jinja file) and --no-chat-template is not given, each conversation is rendered with it (jinja2,
sandboxed, with messages, bos_token and eos_token as transformers passes them, add_generation_prompt false).
Otherwise the plain format of OLMo's prepare_tulu_data.py is used: every message becomes "<|role|>" and its
content, joined by newlines, so a single turn reads "<|user|>\\n{prompt}\\n<|assistant|>\\n{response}".

Masking. The rendered text is cut into pieces: the content of each message and the scaffolding between them
(role headers, template text). With a template, the conversation is rendered once more for each message with a
marker in place of that message's content: the text before the marker is where the content starts, so a content
string that also occurs in a header cannot be mistaken for it. The rendering must be the marked one with the
content (verbatim, or stripped for templates that trim) in the marker's place; a template that changes or drops
a message's content otherwise is an error (use --no-chat-template). Special-token strings in the scaffolding
(e.g. "<|begin_of_text|>" from bos_token) become their ids; inside message contents they stay plain text, as in
pretraining, so data cannot forge control tokens. The label mask is True exactly on the tokens of assistant
contents (with --assistant-turns last, only the last one's, which is what OLMo does), on an EOS the template
places right after an assistant content (it ends the turn) and on the EOS that ends the example; system and user
turns, headers and all other template text are masked. Each example is followed by the tokenizer's EOS (unless
the rendering already ends with it, which is then unmasked instead); no BOS is added unless --bos (or the
template) adds it, as OLMo adds none.

Piece boundaries. The text between two scaffolding special tokens is tokenized whole, and the tokens of each
piece are found by tokenizing the text up to each boundary where the mask changes: when those prefix tokens are
the start of the whole text's tokens, the example gets exactly the tokens of its whole rendered text (the
concatenation of the pieces' tokens equals them). When a token would straddle a boundary (e.g. a template
header "assistant: " before content "It...", where the whole text has the one token " It"), that text is
tokenized piece by piece instead, as OLMo does for prompt and completion: every mask boundary stays exact,
the prompt ends as it does at generation time (rendered up to the assistant header), and the tokens still spell
the text, only split differently. Such examples are kept and counted (`boundary_mismatches` in
prepare_info.json, with the first such record).

Length. An example longer than --max-seq-len is truncated to its first --max-seq-len tokens, as OLMo does
(its EOS may be cut), or left out with --too-long drop. Shorter ones are padded to --max-seq-len with --pad-id
(default: the tokenizer's pad token, else EOS, as OLMo's tokenizer falls back), padding masked. An example left
with no label (e.g. a prompt longer than --max-seq-len) is left out and counted: it would only add compute.

User errors (a missing file, a record with neither messages nor prompt/response, an unknown role, no assistant
turn, no examples at all, a template failure) are one line "error: ..." naming the record (line number for
local files) and exit code 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
ROLES = ("system", "user", "assistant")
OUTPUTS = ("input_ids.npy", "label_mask.npy", "prepare_info.json")
MARKER = "\x00sft-content-marker\x00"


class UserError(Exception):
    """A problem with the input or the options: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- reading records


def is_local(source: str) -> bool:
    """A path (an existing one, or one that looks like a file), not a hub name such as allenai/tulu-v2-sft-mixture."""
    return os.path.exists(source) or source.endswith((".json", ".jsonl", ".gz")) or source.startswith(("/", ".", "~"))


def read_records(source: str, split: str) -> Iterator[tuple[str, object]]:
    """(where, record): where is "line N" for local files, "record N" for JSON arrays and hub datasets."""
    if is_local(source):
        if not os.path.isfile(source):
            raise UserError(f"{source}: no such file")
        yield from _read_local(source)
        return
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - any failure to reach or parse the hub dataset is the user's to fix
        raise UserError(f"cannot load hub dataset {source!r} (split {split!r}): {_one_line(e)}") from None
    for i, rec in enumerate(ds, 1):
        yield f"record {i}", rec


def _read_local(path: str) -> Iterator[tuple[str, object]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: not valid JSON: {e}") from None
                for i, rec in enumerate(data, 1):
                    yield f"record {i}", rec
                return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON: {e}") from None
            yield f"line {n}", rec


def _check_messages(msgs: object, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _pair(rec: dict) -> tuple[object, object] | None:
    """(prompt, response) of a prompt/response or instruction[/input]/output record."""
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return rec["prompt"], rec.get("response", rec.get("completion"))
    if "instruction" in rec and "output" in rec:
        prompt = rec["instruction"]
        if isinstance(prompt, str) and isinstance(rec.get("input"), str) and rec["input"].strip():
            prompt = f"{prompt}\n\n{rec['input']}"
        return prompt, rec["output"]
    return None


def to_messages(rec: object, where: str) -> list[dict[str, str]]:
    """The record as a list of {role, content}, up to its last assistant turn."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    if "messages" in rec:
        out = _check_messages(rec["messages"], where)
    elif (pair := _pair(rec)) is not None:
        out = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    else:
        raise UserError(f"{where}: record has neither 'messages' nor 'prompt'/'response' (or 'instruction'/"
                        f"'output') fields; it has {', '.join(map(repr, rec)) or 'no fields'}")
    for i, m in enumerate(out, 1):
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} ({m['role']}) content must be a string, not "
                            f"{type(m['content']).__name__}")
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: conversation has no assistant turn, so nothing to learn")
    return out[:last + 1]


# ----------------------------------------------------------------------------- tokenizer helpers


def tokenizer_config_dir(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def load_tokenizer_config(path: str) -> dict:
    cfg_path = os.path.join(tokenizer_config_dir(path), "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON: {e}") from None
    return cfg if isinstance(cfg, dict) else {}


def find_chat_template(path: str, cfg: dict) -> str | None:
    """The tokenizer's chat template: tokenizer_config.json `chat_template` (a string, or a list of named
    templates: "default"), else a chat_template.jinja file next to it."""
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str) and tpl.strip():
        return tpl
    jinja_path = os.path.join(tokenizer_config_dir(path), "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return None


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens(tokenizer) -> dict[str, int]:
    """Special-token strings -> ids, for scaffolding text (templates write e.g. {{ bos_token }} as text)."""
    out: dict[str, int] = {}
    raw = getattr(tokenizer, "_model", None)
    if hasattr(raw, "get_added_tokens_decoder"):  # HF tokenizer.json
        out.update({t.content: i for i, t in raw.get_added_tokens_decoder().items() if t.special})
    out.update(getattr(tokenizer, "special_tokens", None) or {})  # tiktoken
    for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        if i is not None:
            text = tokenizer.decode([i])
            if text and text.strip() == text:
                out.setdefault(text, i)
    return {k: v for k, v in out.items() if k}


class PieceEncoder:
    """Scaffolding is split at special-token strings (which become their ids); everything else is plain text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.specials = special_tokens(tokenizer)
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def plain(self, text: str) -> list[int]:
        return self.tok.encode(text, bos=False, eos=False) if text else []

    def scaffold_parts(self, text: str) -> list[str | int]:
        """Text parts and special ids, in order."""
        if self._split is None:
            return [text]
        return [self.specials[part] if i % 2 else part for i, part in enumerate(self._split.split(text))]

    def run(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool], bool]:
        """(ids, mask, whole) of contiguous text in labelled segments: the whole text's tokens cut at the label
        changes when that is possible (whole = True), else each segment's own tokens."""
        merged: list[list] = []
        for text, label in segments:
            if not text:
                continue
            if merged and merged[-1][1] == label:
                merged[-1][0] += text
            else:
                merged.append([text, label])
        text = "".join(t for t, _ in merged)
        ids = self.plain(text)
        cuts, end = [], 0
        for t, _ in merged[:-1]:
            end += len(t)
            head = self.plain(text[:end])
            if ids[:len(head)] != head:
                break
            cuts.append(len(head))
        else:
            bounds = [0, *cuts, len(ids)]
            mask = [label for (_, label), lo, hi in zip(merged, bounds, bounds[1:]) for _ in range(hi - lo)]
            return ids, mask, True
        ids, mask = [], []
        for t, label in merged:
            part = self.plain(t)
            ids += part
            mask += [label] * len(part)
        return ids, mask, False


# ----------------------------------------------------------------------------- rendering


@dataclass
class Piece:
    text: str
    content_of: str | None  # the role whose content this is; None for scaffolding
    turn: int = -1  # index of the message


def plain_pieces(msgs: list[dict[str, str]]) -> list[Piece]:
    """OLMo/Tulu's format: "<|role|>" and content of every message, joined by newlines."""
    pieces = []
    for i, m in enumerate(msgs):
        pieces.append(Piece(("\n" if i else "") + f"<|{m['role']}|>\n", None))
        pieces.append(Piece(m["content"], m["role"], i))
    return pieces


class ChatTemplate:
    def __init__(self, source: str, cfg: dict):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the tokenizer's chat template does not parse: {_one_line(e)}") from None
        self.variables = {k: _token_text(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token",
                                                                    "unk_token")}

    def render(self, msgs: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self.variables)
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad data) name the record
            raise UserError(f"{where}: the chat template failed: {_one_line(e)}") from None

    def pieces(self, msgs: list[dict[str, str]], where: str) -> list[Piece]:
        full = self.render(msgs, False, where)
        pieces, pos = [], 0
        for i, m in enumerate(msgs):
            # Where message i's content goes: render the conversation with a marker in its place.
            marked = self.render(msgs[:i] + [{**m, "content": MARKER}] + msgs[i + 1:], False, where)
            at = marked.find(MARKER)
            head, tail = marked[:max(at, 0)], marked[at + len(MARKER):]
            content = next((c for c in (m["content"], m["content"].strip()) if at >= pos and
                            full == head + c + tail), None)
            if at < 0 or content is None:
                raise UserError(f"{where}: the chat template does not render message {i + 1} ({m['role']}) "
                                f"verbatim in one place, so its tokens cannot be told apart; use --no-chat-template")
            pieces.append(Piece(full[pos:at], None))
            pieces.append(Piece(content, m["role"], i))
            pos = at + len(content)
        pieces.append(Piece(full[pos:], None))
        return pieces


# ----------------------------------------------------------------------------- examples


@dataclass
class Stats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    label_tokens: int = 0
    boundary_mismatches: int = 0
    first_mismatch: str | None = None
    longest: int = 0


def encode_example(pieces: list[Piece], enc: PieceEncoder, eos: int, bos: int | None, last_only: bool
                   ) -> tuple[list[int], list[bool], bool]:
    """(ids, label mask, whether they are the whole text's tokens) of one example, before the length rules."""
    last_turn = max(p.turn for p in pieces if p.content_of == "assistant")
    ids: list[int] = [] if bos is None else [bos]
    mask: list[bool] = [False] * len(ids)
    whole, run = True, []  # run: the (text, label) segments since the last special token

    def flush() -> None:
        nonlocal whole
        part, m, same = enc.run(run)
        ids.extend(part)
        mask.extend(m)
        whole = whole and same
        run.clear()

    for p in pieces:
        if p.content_of is not None:
            run.append((p.text, p.content_of == "assistant" and (not last_only or p.turn == last_turn)))
            continue
        for part in enc.scaffold_parts(p.text):
            if isinstance(part, str):
                if part:
                    run.append((part, False))
                continue
            # The template's EOS right after a trained assistant content ends that turn: it is a label too.
            ends_turn = part == eos and bool(run) and run[-1][1] and bool(run[-1][0])
            flush()
            ids.append(part)
            mask.append(ends_turn)
    flush()
    if ids and ids[-1] == eos:
        mask[-1] = True
    else:
        ids.append(eos)
        mask.append(True)
    return ids, mask, whole


def pick_dtype(requested: str, vocab_size: int, tokenizer_path: str) -> str:
    """The requested dtype if every token id fits it; "auto" picks the smallest that fits."""
    from torchtitan.datasets.memmap import token_dtype
    from torchtitan.tools.errors import DataError

    try:
        return token_dtype(requested, vocab_size, tokenizer_path)
    except DataError as e:
        raise UserError(f"{e}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def train_command(out_dir: str, dtype: str, seq_len: int, config: str, tokenizer: str | None) -> str:
    cmd = (f"CONFIG={config} ./run_train.sh --data.paths=[{os.path.join(out_dir, 'input_ids.npy')}] "
           f"--data.label_mask_paths=[{os.path.join(out_dir, 'label_mask.npy')}] --load_path=CKPT "
           f"--reset_trainer_state --training.seq_len {seq_len}")
    if dtype != "uint16":
        cmd += f" --data.memmap_dtype {dtype}"
    if tokenizer:
        cmd += f" --model.tokenizer_path {tokenizer}"
    return cmd


def train_toml(out_dir: str, dtype: str, seq_len: int) -> list[str]:
    return ["[data]", 'dataset = "memmap"',
            f"memmap_paths = [{json.dumps(os.path.join(out_dir, 'input_ids.npy'))}]",
            f"memmap_label_mask_paths = [{json.dumps(os.path.join(out_dir, 'label_mask.npy'))}]",
            f'memmap_dtype = "{dtype}"', "[training]", f"seq_len = {seq_len}",
            "[checkpoint]", 'initial_load_path = "CKPT"', "initial_load_model_only = false",
            "reset_trainer_state = true"]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (and docs/datasets.md) for the masking rule.")
    p.add_argument("--source", required=True, help="a local .jsonl/.jsonl.gz/.json file or a hub dataset name")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--split", default="train", help="hub dataset split (default: train)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer file or folder (default: bundled)")
    p.add_argument("--tokenizer-backend", default="auto", choices=["auto", "tokenizers"])
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per example, after padding (default 2048)")
    p.add_argument("--too-long", default="truncate", choices=["truncate", "drop"],
                   help="longer examples: keep their first --max-seq-len tokens (OLMo) or leave them out")
    p.add_argument("--pad-id", type=int, default=None, help="padding id (default: the tokenizer's pad, else EOS)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--no-chat-template", action="store_true", help="use the plain <|role|> format even when the "
                                                                   "tokenizer has a chat template")
    p.add_argument("--assistant-turns", default="all", choices=["all", "last"],
                   help="which assistant turns are labels: all (default) or only the last (as OLMo)")
    p.add_argument("--bos", action="store_true", help="start every example with the tokenizer's BOS (masked)")
    p.add_argument("--max-examples", type=int, default=None, help="stop after this many records")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out-dir")
    p.add_argument("--train-config", default="train_configs/debug_model.toml",
                   help="config named in the printed training command")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch: list[str] = []
    try:
        _run(args, scratch)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for tmp in scratch:  # the outputs are written here and moved into --out-dir only on success
            shutil.rmtree(tmp, ignore_errors=True)


def _check_out_dir(args: argparse.Namespace) -> str:
    out_dir = os.path.abspath(args.out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {args.out_dir} is a file")
    present = [n for n in OUTPUTS if os.path.exists(os.path.join(out_dir, n))]
    if present and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds {', '.join(present)}; use another --out-dir or --overwrite")
    return out_dir


@dataclass
class Setup:
    tokenizer: object
    enc: PieceEncoder
    template: ChatTemplate | None
    dtype: str
    eos: int
    pad: int
    bos: int | None


def _setup(args: argparse.Namespace) -> Setup:
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.tools.errors import ConfigError

    try:
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_backend)
    except ConfigError as e:
        raise UserError(_one_line(e)) from None
    dtype = pick_dtype(args.dtype, tokenizer.vocab_size, args.tokenizer)
    eos = tokenizer.eos_id
    pad = args.pad_id if args.pad_id is not None else (tokenizer.pad_id if tokenizer.pad_id is not None else eos)
    if not 0 <= pad < tokenizer.vocab_size:
        raise UserError(f"--pad-id {pad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")
    if args.bos and tokenizer.bos_id is None:
        raise UserError(f"--bos: tokenizer {args.tokenizer} has no BOS token")
    cfg = load_tokenizer_config(args.tokenizer)
    template_src = None if args.no_chat_template else find_chat_template(args.tokenizer, cfg)
    template = ChatTemplate(template_src, cfg) if template_src else None
    return Setup(tokenizer, PieceEncoder(tokenizer), template, dtype, eos, pad, tokenizer.bos_id if args.bos else None)


def _write_examples(args: argparse.Namespace, su: Setup, tmp: str) -> Stats:
    """Every example, padded to --max-seq-len, appended to tmp/input_ids.npy and tmp/label_mask.npy."""
    stats, n, np_dtype = Stats(), args.max_seq_len, np.dtype(su.dtype)
    records = read_records(args.source, args.split)
    if args.max_examples is not None:
        records = itertools.islice(records, args.max_examples)
    with open(os.path.join(tmp, "input_ids.npy"), "wb") as f_ids, \
            open(os.path.join(tmp, "label_mask.npy"), "wb") as f_mask:
        for where, rec in records:
            stats.records += 1
            msgs = to_messages(rec, where)
            pieces = su.template.pieces(msgs, where) if su.template else plain_pieces(msgs)
            ids, mask, whole = encode_example(pieces, su.enc, su.eos, su.bos, args.assistant_turns == "last")
            stats.longest = max(stats.longest, len(ids))
            if not whole:
                stats.boundary_mismatches += 1
                stats.first_mismatch = stats.first_mismatch or where
            if len(ids) > n:
                if args.too_long == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                ids, mask = ids[:n], mask[:n]
            if not any(mask[1:]):  # an instance's first token is never a label
                stats.dropped_no_labels += 1
                continue
            stats.examples += 1
            stats.label_tokens += sum(mask[1:])
            f_ids.write(np.asarray(ids + [su.pad] * (n - len(ids)), dtype=np_dtype).tobytes())
            f_mask.write(np.asarray(mask + [False] * (n - len(mask)), dtype=np.bool_).tobytes())
    if stats.records == 0:
        raise UserError(f"{args.source} has no records")
    if stats.examples == 0:
        raise UserError(f"no examples left out of {stats.records} records ({stats.dropped_too_long} longer than "
                        f"--max-seq-len {n}, {stats.dropped_no_labels} with no assistant token within it)")
    return stats


def _run(args: argparse.Namespace, scratch: list[str]) -> None:
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len {args.max_seq_len}: an example needs at least 2 tokens")
    out_dir = _check_out_dir(args)
    if is_local(args.source) and not os.path.isfile(args.source):
        raise UserError(f"{args.source}: no such file")
    su = _setup(args)
    parent = os.path.dirname(out_dir)
    tmp = tempfile.mkdtemp(prefix=".prepare_sft-", dir=parent if os.path.isdir(parent) else None)
    scratch.append(tmp)
    stats = _write_examples(args, su, tmp)

    n, dtype = args.max_seq_len, su.dtype
    tokenizer_arg = None if os.path.abspath(args.tokenizer) == DEFAULT_TOKENIZER else os.path.abspath(args.tokenizer)
    command = train_command(out_dir, dtype, n, args.train_config, tokenizer_arg)
    info = {
        "source": args.source, "tokenizer": os.path.abspath(args.tokenizer), "vocab_size": su.tokenizer.vocab_size,
        "format": "chat_template" if su.template else "plain",
        "assistant_turns": args.assistant_turns, "eos_id": su.eos, "pad_id": su.pad, "bos_id": su.bos,
        "dtype": dtype, "max_seq_len": n, "too_long": args.too_long, "records": stats.records,
        "examples": stats.examples, "tokens": stats.examples * n, "label_tokens": stats.label_tokens,
        "truncated": stats.truncated, "dropped_too_long": stats.dropped_too_long,
        "dropped_no_labels": stats.dropped_no_labels, "longest_example": stats.longest,
        "boundary_mismatches": stats.boundary_mismatches, "first_boundary_mismatch": stats.first_mismatch,
        "files": {"input_ids": os.path.join(out_dir, "input_ids.npy"),
                  "label_mask": os.path.join(out_dir, "label_mask.npy")},
        "train_command": command, "train_toml": train_toml(out_dir, dtype, n),
    }
    with open(os.path.join(tmp, "prepare_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:
        shutil.move(os.path.join(tmp, name), os.path.join(out_dir, name))

    print(f"{stats.records} records -> {stats.examples} examples of {n} tokens ({dtype}) in {args.out_dir}: "
          f"{stats.label_tokens:,} label tokens; {stats.truncated} truncated, {stats.dropped_too_long} dropped as "
          f"too long, {stats.dropped_no_labels} dropped with no label")
    print(f"format: {info['format']}; EOS {su.eos} ends every example; padding id {su.pad}")
    if stats.boundary_mismatches:
        print(f"note: {stats.boundary_mismatches} examples are tokenized piece by piece at a turn boundary (first: "
              f"{stats.first_mismatch}); see the docstring")
    print(f"train on it with (CKPT: the checkpoint to start from):\n{command}\nor in TOML:\n"
          + "\n".join(info["train_toml"]))


if __name__ == "__main__":
    sys.exit(main())
