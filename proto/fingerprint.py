"""Model-pair fingerprint and id space: what edge and cloud compare before verifying anything.

Two models can only be paired when token ids mean the same thing on both sides. That is a property of
the tokenizer, not of the models' output layers, so the fingerprint pairs on two keys:

- ``tokenizer_hash``: sha256 over the sorted token→id map, added tokens included. It is taken over the
  mapping, not the file bytes, so re-saving ``tokenizer.json`` (other JSON formatting) does not change
  it, while any change of a token or id does.
- ``id_space``: N, the number of ids the tokenizer can produce (``id_space`` below). Every logit row is
  sliced to N on both sides before anything else, and every id on the wire is checked against N.

A fingerprint also carries ``logit_width``, the model's own number of logit rows. Widths are recorded,
never compared: real pairs sharing one tokenizer pad their output layers differently (Qwen2.5-0.5B has
151,936 rows, Qwen2.5-7B 152,064, their tokenizer 151,665 ids), and the rows past N are padding that no
text uses. A model with fewer rows than N is an error (``check_logit_width``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PAIRING_KEYS = ("tokenizer_hash", "id_space")  # what must be equal; ``logit_width`` is only recorded


def _token_ids(tokenizer) -> dict[str, int]:
    """The full token→id map, added tokens included.

    ``tokenizer``: a ``tokenizer.json`` path, a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
    """
    from tokenizers import Tokenizer  # an edge and a cloud dependency, imported lazily for light callers

    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers fast -> tokenizers
    return tokenizer.get_vocab(with_added_tokens=True)


def tokenizer_hash(tokenizer) -> str:
    """sha256 (hex, first 16 chars) of the tokenizer's full token→id map, added tokens included."""
    canonical = json.dumps(sorted(_token_ids(tokenizer).items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def id_space(tokenizer) -> int:
    """N = the largest token id + 1, over every entry the tokenizer has (added tokens included).

    max + 1 and not the number of entries: ids need not be contiguous (added tokens placed at fixed ids
    above a hole, a trimmed vocabulary), and then ``len`` falls short of the highest id the tokenizer
    emits, which would be refused. Every id in [0, N) that is not a token is simply never produced.
    """
    ids = _token_ids(tokenizer).values()
    if not ids:
        raise ValueError("the tokenizer has no tokens: it defines no id space")
    return max(ids) + 1


def check_logit_width(logit_width: int, n: int, what: str) -> None:
    """ValueError when ``what`` has fewer logit rows than the tokenizer's id space ``n``."""
    if logit_width < n:
        raise ValueError(f"{what} has {logit_width} logit rows but its tokenizer's id space is {n}: ids "
                         f"{logit_width}..{n - 1} can never be produced or embedded; use the tokenizer the model "
                         "was trained with")


def pairing_key(fingerprint: dict) -> tuple:
    """(tokenizer hash, id space): the part of a fingerprint two models must share."""
    return tuple(fingerprint.get(k) for k in PAIRING_KEYS)


def describe_mismatch(local: dict, remote: dict) -> str | None:
    """A message naming both (tokenizer hash, id space) pairs when they differ, else None."""
    if pairing_key(local) == pairing_key(remote):
        return None
    mine = ", ".join(f"{k}={local.get(k)}" for k in PAIRING_KEYS)
    theirs = ", ".join(f"{k}={remote.get(k)}" for k in PAIRING_KEYS)
    return f"model pair mismatch: edge has ({mine}) but the verifier's model has ({theirs})"
