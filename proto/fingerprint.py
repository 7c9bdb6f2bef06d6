"""Model-pair fingerprint: what edge and cloud compare before verifying anything.

Two models can only be paired when token ids mean the same thing on both sides. The fingerprint is
(vocabulary size of the output layer, hash of the tokenizer's token→id map). The hash is taken over the
sorted mapping, not the file bytes, so re-saving ``tokenizer.json`` (different JSON formatting) does not
change it, while any change of a token or id does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def tokenizer_hash(tokenizer) -> str:
    """sha256 (hex, first 16 chars) of the tokenizer's full token→id map, added tokens included.

    ``tokenizer``: a ``tokenizer.json`` path, a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
    """
    from tokenizers import Tokenizer  # an edge and a cloud dependency, imported lazily for light callers

    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers fast -> tokenizers
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def describe_mismatch(local: dict, remote: dict) -> str | None:
    """A message naming both fingerprints when they differ, else None."""
    keys = ("vocab_size", "tokenizer_hash")
    if all(local.get(k) == remote.get(k) for k in keys):
        return None
    mine = ", ".join(f"{k}={local.get(k)}" for k in keys)
    theirs = ", ".join(f"{k}={remote.get(k)}" for k in keys)
    return f"model pair mismatch: edge has ({mine}) but the verifier's model has ({theirs})"
