"""Which attention implementation a model must be loaded with to compute what its config defines.

transformers loads most architectures with ``sdpa`` (torch's fused kernel). That kernel has no soft-capping:
Gemma-2's ``attn_logit_softcapping`` (scores -> cap * tanh(scores / cap)) is silently dropped under it, so
the model computes something else than it was trained as. Only the ``eager`` implementation applies the cap.
One rule for every place that loads a causal LM: the verifier (``cloud/engine.py``), the ONNX export and its
parity reference (``models/export.py``), so the edge's graph, the parity check and the verifier's q all
compute the same function. (``final_logit_softcapping`` is applied after the LM head under every
implementation and needs nothing here.)
"""

from __future__ import annotations


def attn_implementation(config) -> str | None:
    """``"eager"`` when ``config`` sets attention-logit soft-capping; None = transformers' default."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "eager" if getattr(text_config, "attn_logit_softcapping", None) else None
