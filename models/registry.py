"""Known real model pairs that share a tokenizer (edge SLM → cloud LLM), for the CLI help and the README.

Every pair takes the same code path as the demo pair: ``python -m models export --model EDGE_ID`` on the
edge side, ``python -m cloud serve --model CLOUD_ID`` on the cloud side. The notes say where the two
sides' logits widths differ although the tokenizer is the same (padding rows past the tokenizer's
length, which no text ever uses).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPair:
    name: str
    edge: str
    cloud: str
    edge_vocab: int
    cloud_vocab: int
    notes: str = ""


PAIRS = [
    ModelPair("demo", "models/demo_pair/slm", "models/demo_pair/llm", 32_000, 32_000,
              "offline demo pair trained by `python -m models demo-pair` (32k byte-level BPE)"),
    ModelPair("tinyllama-llama2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-2-7b-chat-hf",
              32_000, 32_000, "U-HLM's pair; Llama-2 SentencePiece tokenizer on both sides (gated repo)"),
    ModelPair("qwen2.5-0.5b-7b", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 151_936, 152_064,
              "same tokenizer (151,665 tokens); logits widths differ: rows past the tokenizer are padding"),
    ModelPair("qwen2-1.5b-72b", "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-72B-Instruct", 151_936, 152_064,
              "same tokenizer; 151,936 vs 152,064 logits: compare tokenizer hashes, not raw widths"),
    ModelPair("llama3.2-1b-3.1-8b", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
              128_256, 128_256, "same 128k tiktoken-style BPE (gated repos)"),
    ModelPair("smollm2-135m-1.7b", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
              49_152, 49_152, "same 49k BPE; a very small edge model"),
    ModelPair("gpt2-gpt2xl", "openai-community/gpt2", "openai-community/gpt2-xl", 50_257, 50_257,
              "GPT-2 export takes no position_ids in some versions: inputs are fed by name"),
]


def format_pairs() -> str:
    rows = [f"{p.name:<20} {p.edge} -> {p.cloud}  (vocab {p.edge_vocab:,} / {p.cloud_vocab:,}) {p.notes}"
            for p in PAIRS]
    return "\n".join(rows)
