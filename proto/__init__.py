"""The wire contract shared by edge and cloud: model-pair fingerprint (and, later, messages and codec)."""
