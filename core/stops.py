"""Stop sets given as characters: the ids whose text holds any of them (where a step, and so a span, ends).

A step of the demo task ends at ';' or '#', and a byte-level BPE merges those characters into many tokens
(';-', ' #-', '##', ');' ... 154 in the demo's 32k vocabulary, hundreds in a real one). Both sides derive
the set from the same characters and the same tokenizer (the pair's fingerprint guarantees it), so the edge
sends the characters, not the ids.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_STOP_CHARS = 32  # Open.span_stop_chars: a handful of characters, not a text


def ids_containing(texts: Iterable[str], chars: str | frozenset[str]) -> frozenset[int]:
    """The ids i whose text (``texts[i]``, each id decoded alone) holds any of ``chars``."""
    wanted = frozenset(chars)
    if not wanted:
        return frozenset()
    return frozenset(i for i, text in enumerate(texts) if wanted.intersection(text))
