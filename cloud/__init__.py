"""Cloud side: the verifier service running the large PyTorch model (engine, rejection math, gRPC server)."""
