"""Prefill service: a gRPC server around an engine in the prefill role."""
