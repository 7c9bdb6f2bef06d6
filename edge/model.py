"""An exported edge model folder, loaded: manifest, tokenizer (the `tokenizers` library) and ORT runtime."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from edge.manifest import load_manifest
from edge.runtime import OnnxCausalLM


class EdgeModel:
    """What the edge needs of a model: encode/decode text, run the decoder (logits over the id space N), know
    its EOS ids."""

    def __init__(self, folder: str | Path, providers: str | list[str] | None = "auto", threads: int = 0):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # Logits come back sliced to the tokenizer's id space: padding rows are never seen past the runtime.
        self.runtime = OnnxCausalLM(self.folder / self.manifest.model_file, providers=providers, threads=threads,
                                    id_space=self.manifest.id_space, max_positions=self.manifest.max_positions)
        self.eos_ids = frozenset(self.manifest.eos_token_ids)
        self.max_positions = self.manifest.max_positions

    def context_full(self, total_tokens: int) -> bool:
        """Whether a sequence of ``total_tokens`` (prompt + generated) has reached the context limit: the
        generation loops stop there (and say so) rather than feed the model a position it has no room for."""
        return self.max_positions is not None and total_tokens >= self.max_positions

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, with the special tokens the tokenizer's post-processor adds (e.g. BOS) unless
        ``add_special_tokens`` is False (a rendered chat template already holds them)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
