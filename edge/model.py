"""An exported edge model folder, loaded: manifest, tokenizer (the `tokenizers` library) and its runtime: ONNX
Runtime for optimum exports (edge/runtime.py), onnxruntime-genai for genai exports (edge/genai_runtime.py)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from edge.manifest import GENAI_CONFIG, ConditioningSpec, Manifest, ModelFolderError, load_manifest
from edge.runtime import OnnxCausalLM

BACKENDS = ("auto", "ort", "genai")  # auto = the runtime the manifest names


class EdgeModel:
    """What the edge needs of a model: encode/decode text, run the decoder (logits over the id space N), know
    its EOS ids."""

    def __init__(self, folder: str | Path, providers: str | list[str] | None = "auto", threads: int = 0,
                 backend: str = "auto"):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # Logits come back sliced to the tokenizer's id space: padding rows are never seen past the runtime.
        self.backend = resolve_backend(self.manifest, backend)  # "ort" | "genai": what runs the decoder
        self.runtime = open_runtime(self.folder, self.manifest, self.backend, providers, threads)
        self.eos_ids = frozenset(self.manifest.eos_token_ids)
        self.max_positions = self.manifest.max_positions
        # A prompt-conditioned SLM: which LLM hidden state to feed its prefill (None: an unconditioned model).
        self.conditioning: ConditioningSpec | None = self.manifest.conditioning_spec
        check_conditioning_input(self.folder, self.conditioning, self.runtime)

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


def check_conditioning_input(folder: Path, spec: ConditioningSpec | None, runtime) -> None:
    """The manifest's conditioning and the graph's input agree (name and width), so a row the verifier sends
    fits the graph; an unconditioned manifest with a conditioned graph is refused too (nobody would feed it)."""
    dim = getattr(runtime, "conditioning_dim", None)
    if spec is None and dim is not None:
        raise ModelFolderError(f"{folder}: the graph takes {runtime.conditioning_input} but manifest.json names no "
                               "conditioning; re-run the export")
    if spec is not None and dim != spec.dim:
        raise ModelFolderError(f"{folder}: manifest.json says conditioning {spec.input} is {spec.dim} wide, the graph "
                               f"takes {dim if dim is not None else 'no such input'}; re-run the export")


def resolve_backend(manifest: Manifest, backend: str = "auto") -> str:
    """``ort`` or ``genai``: the one asked for, or (auto) the runtime the manifest names."""
    if backend not in BACKENDS:
        raise ModelFolderError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return manifest.runtime if backend == "auto" else backend


def open_runtime(folder: Path, manifest: Manifest, backend: str, providers: str | list[str] | None = "auto",
                 threads: int = 0):
    """The decoder for ``folder`` on ``backend`` (ort | genai). Both runtimes have one interface: prefill,
    decode, forward, truncate, reset, cache.length, providers, id_space, logit_width."""
    kwargs = dict(providers=providers, threads=threads, id_space=manifest.id_space,
                  max_positions=manifest.max_positions)
    if backend == "genai":
        from edge.genai_runtime import GenaiCausalLM, is_genai_folder

        if not is_genai_folder(folder):
            raise ModelFolderError(f"{folder} is not an onnxruntime-genai export (no {GENAI_CONFIG}); use "
                                   "--backend ort, or export with: python -m models export --builder genai ...")
        return GenaiCausalLM(folder, **kwargs)
    if manifest.runtime == "genai":  # its graph keeps the KV cache in one shared buffer that only genai drives
        raise ModelFolderError(f"{folder} is an onnxruntime-genai export: run it with --backend genai (or auto)")
    if manifest.conditioning is not None:  # the input name the manifest gives (checked against the graph)
        kwargs["conditioning_input"] = manifest.conditioning["input"]
    return OnnxCausalLM(folder / manifest.model_file, **kwargs)
