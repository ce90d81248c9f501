"""The front door: HTTP (OpenAI-compatible) and gRPC (baton.v1.Generation) APIs, tokenization and
detokenization, routing policy, and the request lifecycle across prefill and decode workers.
Torch-free. Entry point: router.server.Router(RouterConfig, WorkerDirectory)."""
