"""Generated protobuf and gRPC stubs for package baton.v1 (see proto/). Do not edit by hand:
run `make proto`."""
