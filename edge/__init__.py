"""Edge side: ONNX Runtime SLM with KV cache, sampling, generation loop and CLI. Never imports torch."""
