"""Known real model pairs that share a tokenizer (edge SLM → cloud LLM), for the CLI help and the README.

Every pair takes the same code path as the demo pair: ``python -m models export --model EDGE_ID`` on the
edge side, ``python -m cloud serve --model CLOUD_ID`` on the cloud side. Per pair: both models' logit
widths and the tokenizer's id space N. The sides pair on (tokenizer hash, N); where a width exceeds N,
the rows past N are padding that no text uses, and each side slices its logits to N before sampling.
The widths and N are the published configs' and tokenizers' figures, not measured here (no downloads).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPair:
    name: str
    edge: str
    cloud: str
    edge_width: int  # the edge model's logit rows
    cloud_width: int  # the cloud model's logit rows
    id_space: int  # N: the shared tokenizer's largest id + 1
    notes: str = ""

    def describe_slicing(self) -> str:
        """What slicing logits to N does on each side: how many padding rows it drops, if any."""
        drops = [f"{side} drops {width - self.id_space:,} padding rows" for side, width in
                 (("edge", self.edge_width), ("cloud", self.cloud_width)) if width > self.id_space]
        return "both sides slice to N: " + (", ".join(drops) if drops else "a no-op, both widths are N")


PAIRS = [
    ModelPair("demo", "models/demo_pair/slm", "models/demo_pair/llm", 32_000, 32_000, 32_000,
              "offline demo pair trained by `python -m models demo-pair` (32k byte-level BPE)"),
    ModelPair("tinyllama-llama2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-2-7b-chat-hf",
              32_000, 32_000, 32_000, "U-HLM's pair; Llama-2 SentencePiece tokenizer on both sides (gated repo)"),
    ModelPair("qwen2.5-0.5b-7b", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 151_936, 152_064,
              151_665, "same tokenizer (151,665 tokens); the widths differ and are not compared"),
    ModelPair("qwen2-1.5b-72b", "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-72B-Instruct", 151_936, 152_064,
              151_646, "same tokenizer (151,643 BPE + 3 special tokens); the widths differ and are not compared"),
    ModelPair("llama3.2-1b-3.1-8b", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
              128_256, 128_256, 128_256, "same 128k tiktoken-style BPE (gated repos)"),
    ModelPair("smollm2-135m-1.7b", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
              49_152, 49_152, 49_152, "same 49k BPE; a very small edge model"),
    ModelPair("gpt2-gpt2xl", "openai-community/gpt2", "openai-community/gpt2-xl", 50_257, 50_257, 50_257,
              "GPT-2 export takes no position_ids in some versions: inputs are fed by name"),
    ModelPair("phi3-mini-medium", "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-medium-4k-instruct",
              32_064, 32_064, 32_011, "Llama-2 SentencePiece + 11 added chat tokens (32,011 ids) on both sides; "
              "generation_config.json ends turns on 32000, 32001 and 32007"),
    ModelPair("gemma2-2b-9b", "google/gemma-2-2b-it", "google/gemma-2-9b-it", 256_000, 256_000, 256_000,
              "same 256k SentencePiece (gated repos); attention soft-capping: export, parity and verifier load "
              "eager attention (cloud/attention.py), sdpa would drop it"),
]


def format_pairs() -> str:
    rows = [f"{p.name:<20} {p.edge} -> {p.cloud}  (logit rows {p.edge_width:,} / {p.cloud_width:,}, "
            f"id space N = {p.id_space:,}; {p.describe_slicing()}) {p.notes}" for p in PAIRS]
    return "\n".join(rows)
