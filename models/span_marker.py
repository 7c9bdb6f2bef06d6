"""The offload marker of a span-learned SLM: which token id it is, where it goes in the training labels.

SplitReason (arXiv 2504.16379) teaches a small model to emit a special token before the spans it should
hand to the large model. Here the marker is an existing id of the pair's 32,000-entry tokenizer that the
task can never produce, so no token is added and the tokenizer (its hash, the id space N, the pair's
fingerprint) stays exactly the demo pair's.

Glossary:
- *marker*: the id the SLM draws to ask for a span (``edge/coarse.py``, mode ``span-learned``). It never
  enters the text: the edge drops the drawn marker and the LLM writes the rest of the step.
- *task alphabet*: every character a task text can hold (``models/task.py``). Byte-level BPE tokens are
  substrings of the text they encode, so a token whose text shares no character with the alphabet can never
  appear in any task text: that is the proof the marker is unused (tests also encode many problems).
- *step*: the solution's tokens up to and including a token whose text holds a step end (``;`` or ``#``), or
  up to EOS. The BPE merges a step end with the next step's sign (``;-``, `` #-``, ``=-``), so steps are cut
  after the token that holds the end, which is where the edge sees a step begin.
- *label substitution*: the SFT input stays the correct text; only the target at a hard step's first token
  becomes the marker (at inference the marker is never in the context, so the model must not learn to read it).

The marker's choice and its reason are written next to the weights (``span_marker.json``); the export copies
the id into the manifest (``offload_marker_id``), where the edge reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.stops import ids_containing
from models.task import STEP_END_TEXTS
from proto.fingerprint import id_space

MARKER_FILE = "span_marker.json"  # beside the transformers weights; read by models/export.py
TASK_ALPHABET = frozenset("Q:A #+-=;0123456789")  # every character of a task text (tests check it)
STEP_END_CHARS = frozenset("".join(STEP_END_TEXTS).replace(" ", ""))  # ';' and '#' (the answer mark is ' #')
IGNORE = -100  # a label that contributes no loss (the prompt)


def token_text(tokenizer, token_id: int) -> str:
    """The text one id decodes to (a transformers tokenizer; special tokens kept)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def choose_marker_id(tokenizer) -> int:
    """The highest non-special id whose text shares no character with the task alphabet.

    The highest id of a BPE vocabulary is its last (least frequent) merge: a token the SLM never saw as a
    target, whose logit its full-softmax training phase pushed down, and which no task text can contain.
    """
    special = set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer) - 1, -1, -1):
        text = token_text(tokenizer, token_id)
        if token_id not in special and text.strip() and not set(text) & TASK_ALPHABET:
            return token_id
    raise ValueError("every token of the tokenizer shares a character with the task: no marker candidate")


def can_occur_in_task(tokenizer, token_id: int) -> bool:
    """Whether any task text could contain ``token_id`` (its text is made of task characters only)."""
    return set(token_text(tokenizer, token_id)) <= TASK_ALPHABET


def step_end_ids(tokenizer) -> frozenset[int]:
    """Every id whose text holds a step end (``;`` or ``#``): ``;``, `` #`` and the merged ``;-``, `` #-``."""
    return ids_containing((token_text(tokenizer, i) for i in range(id_space(tokenizer))), STEP_END_CHARS)


def step_starts(solution_ids: list[int], ends: frozenset[int]) -> list[int]:
    """Offsets (into ``solution_ids``, EOS included) where a step begins: 0 and after every step-end token."""
    return [0] + [i + 1 for i, t in enumerate(solution_ids[:-1]) if t in ends]


def split_steps(solution_ids: list[int], ends: frozenset[int]) -> list[list[int]]:
    """The solution's ids cut into steps (the last one ends with EOS when the solution does)."""
    starts = step_starts(solution_ids, ends)
    return [solution_ids[a:b] for a, b in zip(starts, starts[1:] + [len(solution_ids)])]


def substitute_labels(ids: list[int], n_prompt: int, hard_starts: list[int], marker_id: int) -> list[int]:
    """Next-token labels of ``ids`` (prompt + solution + EOS) for SFT: ``labels[t]`` is the target of the
    position that reads ``ids[:t+1]``, IGNORE over the prompt, the marker at the first token of each hard step.

    ``hard_starts`` are offsets into the solution (from :func:`step_starts`). The input stays ``ids``.
    """
    labels = [IGNORE] * (n_prompt - 1) + list(ids[n_prompt:]) + [IGNORE]
    for start in hard_starts:
        if not 0 <= start < len(ids) - n_prompt:
            raise ValueError(f"hard step offset {start} outside a solution of {len(ids) - n_prompt} tokens")
        labels[n_prompt - 1 + start] = marker_id
    return labels


def marker_record(tokenizer, marker_id: int) -> dict:
    """What ``span_marker.json`` says: the id, its text, and why it is safe."""
    return {
        "offload_marker_id": marker_id,
        "token": token_text(tokenizer, marker_id),
        "why": ("an existing id (no token added: the tokenizer hash and id space stay the pair's); the highest "
                "non-special id whose text shares no character with the task alphabet "
                f"{''.join(sorted(TASK_ALPHABET))!r}, so no task text can contain it (byte-level BPE tokens "
                "are substrings of the text), and the last BPE merge, never a target before this fine-tune"),
    }


def write_marker_file(folder: Path, record: dict) -> Path:
    path = Path(folder) / MARKER_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_marker_id(folder: str | Path) -> int | None:
    """The marker id a transformers folder declares in ``span_marker.json`` (None: no file, e.g. a hub id)."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())["offload_marker_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid marker file: {exc!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: offload_marker_id must be an integer, got {str(value)[:50]}")
    return value
