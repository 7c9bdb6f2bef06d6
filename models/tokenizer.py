"""The demo pair's 32,000-entry byte-level BPE tokenizer, built offline with the `tokenizers` library.

Trained on a mixed local corpus: the task's training text plus the Python standard library's sources
(text every machine with Python already has). Digits are split individually so arithmetic stays
learnable. Saved as ``tokenizer.json`` + ``tokenizer_config.json``, loadable with
``AutoTokenizer.from_pretrained`` (for the cloud) and ``tokenizers.Tokenizer.from_file`` (for the edge).
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from models.task import sample_problems

VOCAB_SIZE = 32_000
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]


def stdlib_texts(max_bytes: int, seed: int = 0) -> Iterator[str]:
    """Python standard library sources (a deterministic sample), the corpus's general-text part."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
    )
    random.Random(seed).shuffle(files)
    used = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        used += len(text)
        yield text
        if used >= max_bytes:
            return


def task_texts(n_problems: int, seed: int) -> Iterator[str]:
    """Task text from the training split only: the held-out questions never shape the vocabulary."""
    batch = 1000
    problems = sample_problems(n_problems, "train", seed)
    for i in range(0, n_problems, batch):
        yield "\n".join(p.text for p in problems[i : i + batch])


def build_tokenizer(seed: int = 0, stdlib_bytes: int = 40_000_000, n_task: int = 50_000) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=True,
    )

    def corpus() -> Iterator[str]:
        yield from task_texts(n_task, seed)
        yield from stdlib_texts(stdlib_bytes, seed)

    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"BPE reached only {tok.get_vocab_size()} entries, not {VOCAB_SIZE}: the corpus is too small"
        )
    bos_id = tok.token_to_id(BOS)
    # Every encoded sequence starts with <s>, on the edge (tokenizers) and the cloud (transformers) alike.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Save as a transformers fast tokenizer (tokenizer.json, tokenizer_config.json, special tokens)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # Without these, `generate` fails on token_type_ids and right padding breaks batched decoding.
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    fast.save_pretrained(str(out_dir))
