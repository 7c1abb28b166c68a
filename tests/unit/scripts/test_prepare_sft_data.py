"""scripts/prepare_sft_data.py run as a user runs it: fine-tuning token ids plus label masks in OLMo's layout
(scripts/prepare_tulu_data.py), read back through the memmap dataset and the training loss."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.launch import ROOT
from torchtitan.components.tokenizer import build_tokenizer

SCRIPT = os.path.join(ROOT, "scripts", "prepare_sft_data.py")
TOKENIZER = os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
TOK = build_tokenizer(TOKENIZER)
EOS, EOS_TEXT = TOK.eos_id, TOK.decode([TOK.eos_id])

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "6, of course."}]}
# ChatML-like: a BOS, plain-text role headers, each assistant turn closed by the EOS token, others by <|im_end|>.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run(tmp_path, records, *args, name="data.jsonl", env=None):
    src = tmp_path / name
    if records is not None:
        text = "".join(json.dumps(r) + "\n" if not isinstance(r, str) else r + "\n" for r in records)
        if name.endswith(".gz"):
            with gzip.open(src, "wt") as f:
                f.write(text)
        elif name.endswith(".json"):
            src.write_text(json.dumps(records))
        else:
            src.write_text(text)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--source", str(src), "--out-dir", str(out), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
    return proc, out


def prepare(tmp_path, records, *args, **kw):
    proc, out = run(tmp_path, records, *args, **kw)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "prepare_info.json").read_text())
    n = info["max_seq_len"]
    ids = np.fromfile(out / "input_ids.npy", dtype=info["dtype"]).reshape(-1, n).astype(np.int64)
    mask = np.fromfile(out / "label_mask.npy", dtype=np.bool_).reshape(-1, n)
    assert len(ids) == info["examples"]
    return ids, mask, info, out


def spans(ids, mask, value=True):
    """Decoded runs of consecutive tokens whose mask is `value`."""
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(TOK.decode(cur))
            cur = []
    if cur:
        out.append(TOK.decode(cur))
    return out


def enc(text):
    return TOK.encode(text, bos=False, eos=False)


def unpadded(ids, mask):
    """Tokens up to and including the last label (the example's EOS); the rest must be masked padding."""
    end = int(np.flatnonzero(mask)[-1]) + 1
    assert not mask[end:].any() and (ids[end:] == EOS).all()  # bundled tokenizer: no pad token, so EOS pads
    return ids[:end], mask[:end]


def test_prompt_response_is_olmo_format(tmp_path):
    records = [{"prompt": "Say hi", "response": "hi there"},
               {"instruction": "Translate", "input": "bonjour", "output": "hello"},
               {"prompt": "Count", "completion": "1 2 3"}]
    ids, mask, info, _ = prepare(tmp_path, records, "--max-seq-len", "48")
    assert info["format"] == "plain" and info["dtype"] == "uint16" and ids.shape == (3, 48)
    for row, m, (prompt, response) in zip(ids, mask, [("Say hi", "hi there"), ("Translate\n\nbonjour", "hello"),
                                                       ("Count", "1 2 3")]):
        x, y = unpadded(row, m)
        # Exactly OLMo's preprocess: encode(prompt text) + encode(completion) + EOS; the prompt masked.
        head = enc(f"<|user|>\n{prompt}\n<|assistant|>\n")
        assert x.tolist() == head + enc(response) + [EOS]
        assert y.tolist() == [False] * len(head) + [True] * (len(x) - len(head))
        assert spans(row, m) == [response + EOS_TEXT]
    assert info["label_tokens"] == int(mask[:, 1:].sum()) and info["tokens"] == 3 * 48


def test_multi_turn_masks_every_non_assistant_turn(tmp_path):
    ids, mask, info, _ = prepare(tmp_path, [CHAT], "--max-seq-len", "96")
    assert spans(ids[0], mask[0]) == ["It is 4.", "6, of course." + EOS_TEXT]
    assert spans(ids[0], mask[0], False)[:2] == ["<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n",
                                                 "\n<|user|>\nAnd 3+3?\n<|assistant|>\n"]
    x, _ = unpadded(ids[0], mask[0])
    assert TOK.decode(x.tolist()) == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\nIt is 4.\n"
                                      "<|user|>\nAnd 3+3?\n<|assistant|>\n6, of course." + EOS_TEXT)
    assert info["boundary_mismatches"] == 0
    # OLMo's choice: only the final assistant message is a label.
    ids, mask, _, _ = prepare(tmp_path, [CHAT], "--max-seq-len", "96", "--assistant-turns", "last", "--overwrite")
    assert spans(ids[0], mask[0]) == ["6, of course." + EOS_TEXT]


def test_turns_after_the_last_assistant_are_left_out(tmp_path):
    rec = {"messages": CHAT["messages"][1:3] + [{"role": "user", "content": "Thanks"}]}
    ids, mask, _, _ = prepare(tmp_path, [rec], "--max-seq-len", "64")
    x, _ = unpadded(ids[0], mask[0])
    assert "Thanks" not in TOK.decode(x.tolist()) and spans(ids[0], mask[0]) == ["It is 4." + EOS_TEXT]


def template_tokenizer(tmp_path, template=TEMPLATE):
    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return str(tok_dir)


def test_chat_template_scaffolding_is_masked(tmp_path):
    tok = template_tokenizer(tmp_path)
    # Contents equal to header words, whitespace the template trims, and a user trying to forge an EOS.
    rec = {"messages": [{"role": "user", "content": "user"}, {"role": "assistant", "content": " assistant \n"},
                        {"role": "user", "content": f"stop{EOS_TEXT}"}, {"role": "assistant", "content": "im_start"}]}
    ids, mask, info, _ = prepare(tmp_path, [CHAT, rec], "--tokenizer", tok, "--max-seq-len", "128")
    assert info["format"] == "chat_template"
    for row, m, want in zip(ids, mask, [["It is 4." + EOS_TEXT, "6, of course." + EOS_TEXT],
                                        ["assistant" + EOS_TEXT, "im_start" + EOS_TEXT]]):
        x, y = unpadded(row, m)
        assert x[0] == TOK.bos_id and not y[0]  # {{ bos_token }} is the BOS id, masked
        # The template's EOS after each assistant turn is the EOS id, a label; the rendering ends with it.
        assert spans(row, m) == want
        assert [i for i, t in enumerate(x.tolist()) if t == EOS] == [i for i, t in enumerate(x.tolist())
                                                                    if t == EOS and y[i]]
        assert x[-1] == EOS and (x == EOS).sum() == 2
        masked = "".join(spans(row, m, False)[:-1])
        assert "<|im_start|>assistant\n" in masked and "<|im_end|>" in masked
    assert TOK.decode(unpadded(ids[0], mask[0])[0].tolist()) == (
        f"{TOK.decode([TOK.bos_id])}<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        f"<|im_start|>assistant\nIt is 4.{EOS_TEXT}<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        f"6, of course.{EOS_TEXT}")
    # --no-chat-template: the plain format even though the folder has a template.
    ids, mask, info, _ = prepare(tmp_path, [CHAT], "--tokenizer", tok, "--max-seq-len", "96", "--no-chat-template",
                                 "--overwrite")
    assert info["format"] == "plain" and spans(ids[0], mask[0])[0] == "It is 4."


def test_template_that_changes_content_is_an_error(tmp_path):
    tok = template_tokenizer(tmp_path, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n"
                                       "{% endfor %}")
    proc, out = run(tmp_path, [CHAT], "--tokenizer", tok)
    assert proc.returncode == 2 and proc.stderr.startswith("error: line 1: the chat template does not render")
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_piece_boundary_that_the_tokenizer_would_merge(tmp_path):
    # "assistant: It is 4.": tokenized whole, " It" is one token that straddles the header/content boundary.
    tok = template_tokenizer(tmp_path, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert enc("assistant: It") != enc("assistant: ") + enc("It")
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\nok"}]}
    ids, mask, info, _ = prepare(tmp_path, [rec, CHAT], "--tokenizer", tok, "--max-seq-len", "96")
    # The first record's boundaries are token boundaries of the whole text (": " then "\n"); the second's are not.
    assert info["boundary_mismatches"] == 1 and info["first_boundary_mismatch"] == "line 2"
    x, y = unpadded(ids[0], mask[0])
    assert x.tolist() == enc("user: Q\nassistant: \nok\n") + [EOS]
    assert spans(ids[0], mask[0]) == ["\nok", EOS_TEXT]
    # Piece by piece: the assistant tokens are exactly its contents, the text is unchanged.
    assert spans(ids[1], mask[1]) == ["It is 4.", "6, of course.", EOS_TEXT]
    x, y = unpadded(ids[1], mask[1])
    assert TOK.decode(x.tolist()) == ("system: Be brief.\nuser: What is 2+2?\nassistant: It is 4.\nuser: And 3+3?\n"
                                      "assistant: 6, of course.\n" + EOS_TEXT)
    assert x.tolist() == (enc("system: Be brief.\nuser: What is 2+2?\nassistant: ") + enc("It is 4.")
                          + enc("\nuser: And 3+3?\nassistant: ") + enc("6, of course.") + enc("\n") + [EOS])


def test_truncate_drop_and_padding(tmp_path):
    long = {"prompt": "Tell", "response": "word " * 40}
    full_len = len(enc("<|user|>\nTell\n<|assistant|>\n") + enc("word " * 40)) + 1
    ids, mask, info, _ = prepare(tmp_path, [long, {"prompt": "a", "response": "b"}], "--max-seq-len", "24")
    assert info["truncated"] == 1 and info["longest_example"] == full_len and ids.shape == (2, 24)
    head = enc("<|user|>\nTell\n<|assistant|>\n")
    assert ids[0].tolist() == (head + enc("word " * 40))[:24]  # OLMo: the first max_seq_len tokens (EOS cut)
    assert mask[0].tolist() == [False] * len(head) + [True] * (24 - len(head))
    short = enc("<|user|>\na\n<|assistant|>\n") + enc("b") + [EOS]
    assert ids[1].tolist() == short + [EOS] * (24 - len(short)) and mask[1, len(short):].sum() == 0
    # --pad-id: masked padding with that id.
    ids, mask, _, _ = prepare(tmp_path, [{"prompt": "a", "response": "b"}], "--max-seq-len", "24", "--pad-id", "7",
                              "--overwrite")
    assert ids[0, len(short):].tolist() == [7] * (24 - len(short)) and not mask[0, len(short):].any()
    # --too-long drop; a prompt filling the whole window leaves no label and is left out either way.
    no_room = {"prompt": "x " * 40, "response": "y"}
    ids, _, info, _ = prepare(tmp_path, [long, no_room, {"prompt": "a", "response": "b"}],
                              "--max-seq-len", "24", "--too-long", "drop", "--overwrite")
    assert (info["examples"], info["dropped_too_long"], info["truncated"]) == (1, 2, 0)
    ids, _, info, _ = prepare(tmp_path, [no_room, {"prompt": "a", "response": "b"}], "--max-seq-len", "24",
                              "--overwrite")
    assert (info["examples"], info["dropped_no_labels"], info["truncated"]) == (1, 1, 1)


def test_the_loss_counts_only_assistant_tokens(tmp_path):
    from torchtitan.components.loss import build_loss_fn
    from torchtitan.config.job_config import Training
    from torchtitan.datasets import IGNORE_INDEX
    from torchtitan.datasets.memmap import MemmapInstances

    records = [CHAT, {"prompt": "Say hi", "response": "hi there"}, {"instruction": "Add", "output": "sum"}]
    ids, mask, info, out = prepare(tmp_path, records, "--max-seq-len", "96")
    inst = MemmapInstances([str(out / "input_ids.npy")], info["dtype"], 96, [str(out / "label_mask.npy")])
    assert len(inst) == 3  # one example per instance
    items = [inst.item(i) for i in range(3)]
    labels = torch.stack([it["label"] for it in items])
    inputs = torch.stack([it["input"] for it in items])
    assert inputs.tolist() == ids.tolist()
    # Labelled positions are those whose next token is an assistant token (or the example's EOS); label = next token.
    want = np.zeros_like(mask)
    want[:, :-1] = mask[:, 1:]
    assert ((labels != IGNORE_INDEX).numpy() == want).all()
    pos = torch.from_numpy(want)
    assert (labels[pos] == inputs[:, 1:][pos[:, :-1]]).all()
    # Those next tokens decode to exactly the assistant contents and the EOS.
    for b, row_want in enumerate([["It is 4.", "6, of course." + EOS_TEXT], ["hi there" + EOS_TEXT],
                                  ["sum" + EOS_TEXT]]):
        assert spans(ids[b, 1:], want[b, :-1]) == row_want
    # The training loss: summed over labelled tokens, divided by their number = mean CE over those positions.
    logits = torch.randn(3, 96, TOK.vocab_size, generator=torch.Generator().manual_seed(0))
    for cfg in (Training(), Training(loss_chunk_size=50)):
        loss = build_loss_fn(cfg)(logits, labels) / (labels != IGNORE_INDEX).sum()
        b_idx, t_idx = pos.nonzero(as_tuple=True)
        ref = F.cross_entropy(logits[b_idx, t_idx], inputs[b_idx, t_idx + 1])
        assert int(pos.sum()) == info["label_tokens"]
        torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl.gz"])
def test_json_array_and_gzip_inputs(tmp_path, name):
    ids, mask, info, _ = prepare(tmp_path, [CHAT, {"prompt": "a", "response": "b"}], "--max-seq-len", "96",
                                 name=name)
    assert info["examples"] == 2 and spans(ids[1], mask[1]) == ["b" + EOS_TEXT]


def test_outputs_dtype_and_training_command(tmp_path):
    ids, _, info, out = prepare(tmp_path, [CHAT], "--max-seq-len", "96", "--dtype", "uint32")
    assert os.path.getsize(out / "input_ids.npy") == 96 * 4 and os.path.getsize(out / "label_mask.npy") == 96
    assert info["train_command"] == (
        f"CONFIG=train_configs/debug_model.toml ./run_train.sh --data.paths=[{out}/input_ids.npy] "
        f"--data.label_mask_paths=[{out}/label_mask.npy] --load_path=CKPT --reset_trainer_state "
        f"--training.seq_len 96 --data.memmap_dtype uint32")
    assert 'memmap_dtype = "uint32"' in info["train_toml"] and "seq_len = 96" in info["train_toml"]
    _, _, info, _ = prepare(tmp_path, [CHAT], "--overwrite")
    assert info["max_seq_len"] == 2048 and info["train_command"].endswith("--training.seq_len 2048")
    proc, _ = run(tmp_path, [CHAT])  # outputs present, no --overwrite
    assert proc.returncode == 2 and "already holds" in proc.stderr


@pytest.mark.parametrize("records, args, message", [
    (None, [], "error: {src}: no such file"),
    ([CHAT, {"text": "plain"}], [], "error: line 2: record has neither 'messages' nor 'prompt'/'response'"),
    ([{"messages": [{"role": "tool", "content": "x"}]}], [], "error: line 1: message 1 has role 'tool'"),
    ([{"messages": [{"role": "user", "content": "x"}]}], [], "error: line 1: conversation has no assistant turn"),
    (["", "{not json"], [], "error: {src} line 2: not valid JSON"),
    ([], [], "error: {src} has no records"),
    ([{"prompt": "x " * 40, "response": "y"}], ["--max-seq-len", "8"], "error: no examples left out of 1 records"),
    ([{"prompt": "a", "response": 3}], [], "error: line 1: message 2 (assistant) content must be a string"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path, records, args, message):
    proc, out = run(tmp_path, records, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message.format(src=tmp_path / "data.jsonl")), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    assert not out.exists() and sorted(os.listdir(tmp_path)) == (["data.jsonl"] if records is not None else [])


def test_unreachable_hub_dataset_is_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--source", "someorg/no-such-sft-set", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot load hub dataset 'someorg/no-such-sft-set'")
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
