"""Train the tiny byte-level BPE committed as ``torchtitan/assets/tokenizer``.

Tests and debug runs need a real tokenizer without downloads or licences, so we train
one on text that ships with every CPython: the pydoc topic reference. The output is
deterministic (sorted input, single-threaded training), so rerunning the script must
leave the committed files unchanged.

Usage: python scripts/train_debug_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
VOCAB_SIZE = 2048  # includes the two special tokens
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "torchtitan" / "assets" / "tokenizer"


def corpus() -> Iterator[str]:
    """Pydoc topic texts in sorted key order, so training input never varies."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def train(out_dir: Path) -> None:
    # Rayon parallelism could reorder tie-breaking work; one thread keeps output stable.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give back text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # Listed first so they get ids 0 and 1.
        special_tokens=[BOS, EOS],
        # Every byte is in the vocabulary, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        # Lets transformers.AutoTokenizer open the same directory.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with (out_dir / "tokenizer_config.json").open("w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    print(f"wrote {out_dir} (vocab {tok.get_vocab_size()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    train(parser.parse_args().out)


if __name__ == "__main__":
    main()
