"""Router configuration: one frozen dataclass, validated on construction.

Values found at start-up (the model's context length, the tokenizer) live on the running router,
never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.cluster_tls import ClusterTLS
from router.routing import RoutingPolicy


@dataclass(frozen=True)
class RouterConfig:
    model_name: str  # the model id clients send ("model" in OpenAI requests)
    model_dir: str  # HF directory: tokenizer files and config.json
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0 = any free port
    grpc_port: int = 50051  # 0 = any free port
    advertise_host: str | None = None  # host in /prometheus/targets; None = host (or the node IP)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    request_timeout_s: float = 300.0  # whole request, first byte to last token
    prefill_timeout_s: float = 60.0  # one Prefill RPC (compute + KV push)
    reserve_timeout_s: float = 30.0  # until the decode worker answers Reserved
    worker_rpc_timeout_s: float = 5.0  # small RPCs: Abort, GetLoad
    max_stop_strings: int = 16
    max_inflight_requests: int = 1024  # beyond this the router answers 429
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)  # router/routing.py
    graceful_shutdown_s: float = 5.0
    # Keys clients must send (router/auth.py); empty = the public API is open. Kept out of repr.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Sent with every call to a worker (baton/cluster_token.py); None = none. Kept out of repr.
    cluster_token: str | None = field(default=None, repr=False)
    # Mutual TLS to the workers (baton/cluster_tls.py); None = plaintext.
    cluster_tls: ClusterTLS | None = None

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty (it is the id clients ask for)")
        if not self.model_dir:
            raise ValueError("model_dir must be an HF model directory (tokenizer.json, config.json)")
        if not self.host:
            raise ValueError("host must not be empty (use 0.0.0.0 to listen on every interface)")
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] (0 = any free port), got {port}")
        if self.http_port and self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port must differ, both are {self.http_port}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        for name in ("request_timeout_s", "prefill_timeout_s", "reserve_timeout_s",
                     "worker_rpc_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if self.max_inflight_requests <= 0:
            raise ValueError(f"max_inflight_requests must be > 0, got {self.max_inflight_requests}")
        if any(not key or key != key.strip() or " " in key for key in self.api_keys):
            raise ValueError("api_keys must be non-empty strings without spaces")
