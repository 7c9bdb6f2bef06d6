"""onnxruntime-genai backend for the edge: the same decoder interface as ``edge.runtime.OnnxCausalLM``, run by
onnxruntime-genai on a folder written by its model builder (``python -m models export --builder genai``).

Why a second backend: the builder emits a different graph from optimum's (fused GroupQueryAttention,
MatMulNBits int4/int8 weights, one past/present KV buffer shared across steps, no duplicated tied
embedding), which decodes markedly faster on CPU; onnxruntime-genai's ``Generator`` owns that KV buffer.

What this wrapper guarantees, like ``OnnxCausalLM``:
- ``prefill`` / ``decode`` / ``forward`` return logits sliced to the tokenizer's id space N (float32); rows
  past N are never returned.
- ``truncate(length)`` rolls the sequence back (``Generator.rewind_to``) so a rejected draft costs nothing.
- ``providers`` names what really runs: the device onnxruntime-genai reports for the loaded model.
- ``cache.length`` is the number of positions the generator holds.
- A context limit: the generator's ``max_length`` (the size of its KV buffer) is the model's positions
  (``max_positions`` from the manifest, else ``context_length`` from ``genai_config.json``); feeding past it
  raises ``ContextLimitError``, as ``OnnxCausalLM`` does.

The token loop stays on the edge: each step appends the chosen token (``append_tokens``) and reads that
step's logits (``get_logits`` for one token, ``get_output("logits")`` for several: see
``_last_step_logits``); the generator's own search (``generate_next_token``) is never used, because the
hybrid loop chooses tokens itself (drafts from p~, verdicts from the cloud).

The one rewind rule (onnxruntime-genai 0.18.0): after ``rewind_to(n)``, logits must not be read
(``get_logits``) and ``generate_next_token`` must not be called before new tokens are appended: the
generator then still holds the logits of the position before the rewind, and they are wrong for the
rewound sequence. Here logits are read only from ``forward``, right after its own ``append_tokens``, so a
truncate is always followed by an append before anything is read. ``tests/test_genai.py`` checks this
pattern against a fresh prefill of the same ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.manifest import GENAI_CONFIG
from edge.runtime import DecoderSteps, check_context
from proto.fingerprint import check_logit_width

# onnxruntime-genai device names -> the ORT execution providers that run the model's nodes on them; CPU is
# always last, as ORT reports it (it takes the nodes no accelerator provider claims).
DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER_DEVICES = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "CPUExecutionProvider": "cpu",
                    "CUDAExecutionProvider": "cuda"}


def import_genai():
    """The onnxruntime_genai module, or a ValueError saying how to install it (the edge CLI prints it in one
    line)."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise ValueError(f"the genai backend needs onnxruntime-genai ({exc}): pip install onnxruntime-genai "
                         "(onnxruntime-genai-cuda beside onnxruntime-gpu)") from None
    return onnxruntime_genai


def is_genai_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an onnxruntime-genai model (its builder writes ``genai_config.json``)."""
    return (Path(folder) / GENAI_CONFIG).is_file()


def read_genai_config(folder: str | Path) -> dict:
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not an onnxruntime-genai model (no {GENAI_CONFIG}); "
                         "export one with: python -m models export --builder genai ...")
    return json.loads(path.read_text())


def choose_device(requested: str | list[str] | None = "auto") -> str:
    """``cpu`` or ``cuda``: ``auto`` takes CUDA when this onnxruntime-genai build has it, else the CPU."""
    og = import_genai()

    name = requested[0] if isinstance(requested, list) else (requested or "auto")
    device = PROVIDER_DEVICES.get(name, PROVIDER_DEVICES.get(name.lower()))
    if device is None:
        raise ValueError(f"the genai backend runs on cpu or cuda, not {name!r}")
    if device == "auto":
        return "cuda" if og.is_cuda_available() else "cpu"
    if device == "cuda" and not og.is_cuda_available():
        raise ValueError("this onnxruntime-genai build has no CUDA (install onnxruntime-genai-cuda)")
    return device


def load_model(folder: str | Path, device: str = "cpu", threads: int = 0):
    """An ``og.Model`` on ``device`` with ``threads`` intra-op threads (0 = ORT's default).

    The providers are set here, not taken from the folder: a builder config made for CUDA (the fp16 export)
    names CUDA, and the edge must run what it was asked to run.
    """
    og = import_genai()

    config = og.Config(str(folder))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
    if threads:
        # One inter-op thread: the decoder is a chain of nodes; intra-op threads are the ones that help.
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


@dataclass
class SequenceState:
    """What ``OnnxCausalLM.cache`` tells its callers; the keys and values themselves live in the generator."""

    length: int = 0


class GenaiCausalLM(DecoderSteps):
    """One sequence's decoder on onnxruntime-genai: prefill, decode one token, truncate.

    ``id_space``: the tokenizer's N; logits are returned as [.., N] (None keeps every row).
    ``max_positions``: the context limit (the manifest's); None = the builder's ``context_length``. It is also
    the generator's ``max_length``, the positions its shared KV buffer holds, so it is never more than that.
    """

    def __init__(self, folder: str | Path, providers: str | list[str] | None = "auto", threads: int = 0,
                 id_space: int | None = None, max_positions: int | None = None):
        self._og = import_genai()
        self.folder = Path(folder)
        config = read_genai_config(self.folder)["model"]
        self.context_length = int(config["context_length"])  # the positions the builder made room for
        self.max_positions = self.context_length if max_positions is None else min(int(max_positions),
                                                                                   self.context_length)
        self.logit_width = int(config["vocab_size"])  # the model's rows, padding included
        self.id_space = self.logit_width if id_space is None else int(id_space)
        check_logit_width(self.logit_width, self.id_space, str(self.folder))
        self.model = load_model(self.folder, choose_device(providers), threads)
        self.device = self.model.device_type.lower()
        self.providers = list(DEVICE_PROVIDERS.get(self.device, [f"{self.model.device_type}ExecutionProvider"]))
        self.on_cuda = self.device == "cuda"
        self.generator = self._new_generator()
        self.cache = SequenceState()

    def _new_generator(self):
        params = self._og.GeneratorParams(self.model)
        # Greedy, no sampling state: the edge chooses every token; the search only sizes the KV buffer.
        params.set_search_options(max_length=self.max_positions, do_sample=False)
        return self._og.Generator(self.model, params)

    def reset(self) -> None:
        """Forget the sequence. Rewinding to 0 reuses the generator's buffer (a new generator would
        allocate and clear ``max_positions`` positions of KV cache again)."""
        if self.cache.length:
            self.generator.rewind_to(0)
        self.cache = SequenceState()

    def forward(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Run ``token_ids`` after the held context; returns logits [n_new, N] (float32)."""
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        n_new = ids.shape[0]
        if n_new == 0:
            raise ValueError("forward needs at least one token")
        check_context(self.cache.length, n_new, self.max_positions)  # the generator cannot hold more
        self.generator.append_tokens(ids)
        self.cache.length += n_new
        logits = self._last_step_logits(n_new)
        if logits.shape != (n_new, self.logit_width):
            raise RuntimeError(f"{self.folder}: logits of shape {logits.shape} for {n_new} new tokens, expected "
                               f"({n_new}, {self.logit_width})")
        return logits[:, : self.id_space].astype(np.float32, copy=False)  # fp16 exports return fp16 logits

    def _last_step_logits(self, n_new: int) -> np.ndarray:
        """The logits [n_new, width] of the tokens just appended.

        ``get_output("logits")`` is the graph's output itself, every appended row, but costs ~1.2 ms per call
        at a 152k vocabulary (~8% of a 0.5B int4 step). ``get_logits()`` (~35 µs) holds one row: the right one
        after a one-token append, but after a sequence's first, multi-token append it is the last row whose
        token is not the pad id (genai_config's pad_token_id, usually EOS), so a prompt ending in EOS would get
        another position's logits. Hence get_logits for one token, get_output for several.
        """
        if n_new == 1:
            return self.generator.get_logits()[0]  # [1, width]
        return self.generator.get_output("logits")[0]  # [n_new, width]

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (rollback after a rejected draft). No logits are read
        until the next ``forward`` has appended its tokens: see the module docstring's rewind rule."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a sequence of {self.cache.length} positions to {length}")
        if length < self.cache.length:
            self.generator.rewind_to(length)
        self.cache.length = length
