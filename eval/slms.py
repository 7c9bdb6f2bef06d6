"""The edge models a policy can run: the demo SLM and the SLMs the project's own commands derive from it.

A policy names its edge model (``Policy.slm``); most run the committed demo SLM, some need a model of their own:
``span-learned`` the span SLM that draws the offload marker, the ``conditioned*`` rows the LLM-to-SLM SLM, the
``distilled*`` rows the distilled SLM. Each entry says where its ONNX export lives and
which command builds it; ``ensure_slm`` builds a missing one with that command's defaults (minutes, with progress
bars), so a fresh clone measures every row without a manual step. Experiments load each model once
(``SlmCache``) and run every policy on the same verifier, problems and seeds.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.pair import SLM_EXPORT, ensure_export


@dataclass(frozen=True)
class EdgeSlm:
    """One edge model: its export folder and the command that (re)builds it."""

    name: str
    export: Path
    command: tuple[str, ...]  # arguments of ``python -m``; empty = exported by ``ensure_export``
    what: str


SLMS: dict[str, EdgeSlm] = {s.name: s for s in (
    EdgeSlm("demo", SLM_EXPORT, (), "the committed demo SLM"),
    EdgeSlm("span", Path("build/span_slm-onnx"), ("models", "span-slm", "--n-eval", "0"),
            "the demo SLM fine-tuned to draw the offload marker before hard steps (~9 min to build)"),
    EdgeSlm("conditioned", Path("build/conditioned_slm-onnx"), ("models", "conditioned-slm", "--n-eval", "0"),
            "the demo SLM fine-tuned with the LLM's prompt encoding added to its prompt embeddings (LLM-to-SLM)"),
    EdgeSlm("distilled", Path("build/distilled_slm-onnx"), ("models", "distill", "--n-eval", "0"),
            "the demo SLM fine-tuned on the LLM's token distributions (knowledge distillation)"),
)}


def get_slm(name: str) -> EdgeSlm:
    if name not in SLMS:
        raise ValueError(f"unknown edge model {name!r}; known: {', '.join(SLMS)}")
    return SLMS[name]


def ensure_slm(name: str) -> Path:
    """The export folder of edge model ``name``, built by its command first when it is missing."""
    slm = get_slm(name)
    if not slm.command:
        return ensure_export()
    if not (slm.export / "manifest.json").is_file():
        print(f"building {slm.what}: python -m {' '.join(slm.command)}", flush=True)
        subprocess.run([sys.executable, "-m", *slm.command], check=True)
    return slm.export


class SlmCache:
    """Each edge model loaded once (ONNX Runtime sessions are not cheap), built first when missing."""

    def __init__(self, threads: int = 1, providers: str = "auto", overrides: dict[str, Path] | None = None):
        self.threads, self.providers, self.overrides, self.models = threads, providers, overrides or {}, {}

    def get(self, name: str):
        from edge.model import EdgeModel

        if name not in self.models:
            folder = self.overrides.get(name) or ensure_slm(name)
            self.models[name] = EdgeModel(folder, providers=self.providers, threads=self.threads)
        return self.models[name]
