"""Decode service: a gRPC server around an engine in the decode role (and KVTransfer)."""
