"""ONNX Runtime session for a causal LM exported by optimum (`text-generation-with-past`), with a KV cache.

What this wrapper guarantees:
- Execution providers TensorRT → CUDA → CPU as available (or as chosen), and ``providers`` reports the
  ones the session *actually* runs with: ORT silently falls back to CPU when CUDA libraries are missing.
- Inputs are fed by name, never by position: Llama, Qwen2 and GPT-2 exports differ in order and in
  which of ``attention_mask`` / ``position_ids`` they take.
- ``prefill`` (many tokens), ``decode`` (one token) and ``truncate`` (drop cached positions, so a later
  rollback is cheap) on one sequence whose KV cache lives in the wrapper.
- On CUDA, IO binding keeps the KV cache on the device between steps; only logits come back to the host.
- A context limit (``max_positions``, from the manifest): feeding past it raises ContextLimitError, a
  one-line error, instead of an ORT traceback from a position table that has run out.
- Logits come back sliced to the tokenizer's id space N (``id_space``): every caller (the hybrid loop,
  SLM-only generation, the uncertainty estimators) sees [N] rows, never the model's padding rows past N.
- A prompt-conditioned SLM (LLM-to-SLM, ``models/conditioned.py``) has one more input, ``llm_hidden``
  [1, n_new, dim] float32: the frozen LLM's hidden state per new position, added (through a projector inside the
  graph) to the SLM's input embeddings; a zero row adds exactly nothing. ``forward``/``prefill`` take it as
  ``conditioning`` [n_new, dim]; every other call (decode, truncate, a caller that passes nothing, the CUDA IO
  binding path) feeds zeros. A graph without that input is fed exactly what it was fed before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from proto.fingerprint import check_logit_width

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
CONDITIONING_INPUT = "llm_hidden"  # the extra input of a prompt-conditioned SLM's graph (float32 [batch, seq, dim])
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: str | list[str] | None = "auto") -> list[str]:
    """Providers to ask ORT for: ``auto`` = every available one in preference order, else the named ones."""
    available = ort.get_available_providers()
    if requested in (None, "auto"):
        return [p for p in PREFERENCE if p in available]
    names = [requested] if isinstance(requested, str) else list(requested)
    chosen = [PROVIDER_ALIASES.get(n.lower(), n) for n in names]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ValueError(f"execution provider(s) {missing} not available here; available: {available}")
    return chosen


class ContextLimitError(ValueError):
    """Feeding these tokens would take the sequence past the model's context limit."""


def check_context(cached: int, n_new: int, max_positions: int | None) -> None:
    """Raise ContextLimitError when ``cached + n_new`` positions exceed ``max_positions`` (None = no limit)."""
    if max_positions is not None and cached + n_new > max_positions:
        raise ContextLimitError(f"{cached + n_new:,} tokens exceed the model's context limit of {max_positions:,} "
                                f"positions ({cached:,} already in the sequence, {n_new:,} more asked for)")


@dataclass
class KVCache:
    """Past keys/values of one sequence: ``arrays[name]`` is [1, kv_heads, length, head_dim]."""

    arrays: dict[str, object] = field(default_factory=dict)
    length: int = 0


class DecoderSteps:
    """``prefill`` and ``decode`` in terms of a runtime's ``reset`` and ``forward`` (ids -> logits [n_new, N]):
    the same two steps for every edge backend."""

    def prefill(self, token_ids: list[int], conditioning: np.ndarray | None = None) -> np.ndarray:
        """Start a new sequence from ``token_ids``; returns the logits [N] of the last position.

        ``conditioning`` [len(token_ids), dim]: the LLM's hidden-state rows for a prompt-conditioned SLM (None =
        zeros, no conditioning); only a runtime whose ``forward`` takes it is handed it."""
        self.reset()
        if conditioning is None:  # runtimes without conditioning (genai) keep their one-argument forward
            return self.forward(token_ids)[-1]
        return self.forward(token_ids, conditioning=conditioning)[-1]

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token; returns the logits [N] of the next position."""
        return self.forward([token_id])[-1]


class OnnxCausalLM(DecoderSteps):
    """One sequence's decoder: prefill, decode one token, truncate the cache.

    ``id_space``: the tokenizer's N; logits are returned as [.., N]. None keeps every logit row (the export's
    parity check compares the whole output layer). ``max_positions``: the context limit; None = unchecked.
    """

    def __init__(self, onnx_path: str | Path, providers: str | list[str] | None = "auto", threads: int = 0,
                 id_space: int | None = None, max_positions: int | None = None,
                 conditioning_input: str = CONDITIONING_INPUT):
        self.max_positions = max_positions
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=choose_providers(providers))
        self.providers = self.session.get_providers()  # what really runs, after any silent fallback
        self.on_cuda = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._past = {}  # name -> (kv_heads, head_dim, numpy dtype)
        for inp in self.session.get_inputs():
            if _PAST_RE.match(inp.name):
                heads, dim = inp.shape[1], inp.shape[3]
                self._past[inp.name] = (heads, dim, _ORT_TO_NUMPY.get(inp.type, np.float32))
        self._present_for = {name: name.replace("past_key_values", "present") for name in self._past}
        self._output_names = ["logits", *self._present_for.values()]
        missing = [n for n in self._output_names if n not in {o.name for o in self.session.get_outputs()}]
        if missing or "input_ids" not in self._input_names:
            raise ValueError(f"{onnx_path} is not a text-generation-with-past export (missing {missing})")
        self.conditioning_input = conditioning_input
        self.conditioning_dim = self._conditioning_dim(onnx_path)  # None: an unconditioned graph
        self.logit_width = int(self.session.get_outputs()[0].shape[-1])  # the model's rows, padding included
        self.id_space = self.logit_width if id_space is None else int(id_space)  # the width of returned logits
        check_logit_width(self.logit_width, self.id_space, str(onnx_path))
        self.cache = self.empty_cache()

    def empty_cache(self) -> KVCache:
        arrays = {name: np.zeros((1, h, 0, d), dtype=dt) for name, (h, d, dt) in self._past.items()}
        if self.on_cuda:
            arrays = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in arrays.items()}
        return KVCache(arrays, 0)

    def reset(self) -> None:
        self.cache = self.empty_cache()

    def _conditioning_dim(self, onnx_path) -> int | None:
        """The width of the graph's conditioning input (its last axis), or None when it has none."""
        declared = [i for i in self.session.get_inputs() if i.name == self.conditioning_input]
        if not declared:
            return None
        dim = declared[0].shape[-1]
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{onnx_path}: input {self.conditioning_input} needs a fixed last axis, got {dim}")
        return dim

    def _feeds(self, input_ids: np.ndarray, conditioning: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Non-cache inputs, by name; only those this export declares."""
        n_new = input_ids.shape[1]
        total = self.cache.length + n_new
        feeds = {"input_ids": input_ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self._input_names:
            feeds["position_ids"] = np.arange(self.cache.length, total, dtype=np.int64)[None, :]
        if self.conditioning_dim is not None:
            feeds[self.conditioning_input] = self._conditioning_rows(conditioning, n_new)
        return feeds

    def _conditioning_rows(self, conditioning: np.ndarray | None, n_new: int) -> np.ndarray:
        """[1, n_new, dim] float32: the given rows, or zeros (no conditioning: the graph adds exactly nothing)."""
        if conditioning is None:
            return np.zeros((1, n_new, self.conditioning_dim), dtype=np.float32)
        rows = np.asarray(conditioning, dtype=np.float32)
        if rows.shape != (n_new, self.conditioning_dim):
            raise ValueError(f"conditioning must be [{n_new}, {self.conditioning_dim}] (one row per new position), "
                             f"got {list(rows.shape)}")
        return np.ascontiguousarray(rows[None])

    def forward(self, token_ids: list[int] | np.ndarray, conditioning: np.ndarray | None = None) -> np.ndarray:
        """Run ``token_ids`` after the cached context; returns logits [n_new, N] and extends the cache.

        ``conditioning`` [n_new, dim] float32: a prompt-conditioned SLM's LLM hidden-state rows for these positions
        (None: zeros); refused for a graph that takes none."""
        input_ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        if input_ids.shape[1] == 0:
            raise ValueError("forward needs at least one token")
        if conditioning is not None and self.conditioning_dim is None:
            raise ValueError(f"this model takes no conditioning (its graph has no {self.conditioning_input} input)")
        check_context(self.cache.length, input_ids.shape[1], self.max_positions)
        feeds = self._feeds(input_ids, conditioning)
        logits = self._forward_bound(feeds, input_ids.shape[1]) if self.on_cuda else self._forward_host(feeds)
        return logits[:, : self.id_space]  # [n_new, N]: the one place padding rows are dropped

    def _forward_host(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """CPU path: the KV cache is numpy arrays; returns logits [n_new, logit_width]."""
        outputs = self.session.run(self._output_names, {**feeds, **self.cache.arrays})
        self.cache = KVCache(dict(zip(self._past, outputs[1:])), self.cache.length + feeds["input_ids"].shape[1])
        return outputs[0][0]

    def _forward_bound(self, feeds: dict[str, np.ndarray], n_new: int) -> np.ndarray:
        """CUDA path: the KV cache stays an OrtValue on the device; only logits [n_new, logit_width] are copied
        back."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in self.cache.arrays.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for present in self._present_for.values():
            binding.bind_output(present, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache = KVCache(dict(zip(self._past, outputs[1:])), self.cache.length + n_new)
        return outputs[0].numpy()[0]

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (rollback after a rejected draft)."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a cache of {self.cache.length} positions to {length}")
        arrays = {}
        for name, value in self.cache.arrays.items():
            host = value.numpy() if self.on_cuda else value
            kept = np.ascontiguousarray(host[:, :, :length, :])
            arrays[name] = ort.OrtValue.ortvalue_from_numpy(kept, "cuda", 0) if self.on_cuda else kept
        self.cache = KVCache(arrays, length)
