"""Cluster configuration: one YAML file loaded into frozen dataclasses, one per component.

    model: smollm2-135m-instruct      # a name, a .gguf path or an HF directory
    prefill: {count: 1, num_cpus: 1, engine: {kv_cache_memory_bytes: 512MiB}}
    decode:  {count: 1, num_cpus: 1}
    router:  {host: 127.0.0.1, http_port: 8000, grpc_port: 50051}
    kvtransfer: {compression: none}   # int8: about a quarter of float32's bytes, lossy
    redis_url: null                   # null = an embedded redis-server on a free loopback port
    ray_address: null                 # null = a local Ray runtime

`load_config(path, overrides)` reads the file (optional), applies the overrides (dotted keys such as
"prefill.count", as the CLI flags give them; None values mean "flag not given") and validates. Every
mistake raises ConfigError naming the key, the value and what is allowed. deploy/baton.example.yaml
lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.cluster_tls import DEFAULT_SERVER_NAME, ClusterTLS
from engine.config import EngineConfig
from kvtransfer.compression import COMPRESSIONS
from router.routing import RoutingPolicy

DEFAULT_MODEL = "smollm2-135m-instruct"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A configuration mistake the user can fix; the message names the key."""


def parse_size(value: int | str, key: str) -> int:
    """An int, or a string such as "512MiB" / "1GB" / "1048576", as a number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number of bytes such as 536870912 or '512MiB', got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{key} must be a number of bytes such as 536870912 or '512MiB' "
            f"(units: KiB, MiB, GiB, KB, MB, GB), got {value!r}"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class EngineSettings:
    """The operator's engine knobs for one worker role (EngineConfig without the model path)."""

    kv_cache_memory_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto = cuda when the actor has a GPU, else cpu
    num_threads: int | None = None  # torch threads; None = the actor's num_cpus
    block_size: int = 16
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        # EngineConfig owns the rules; build one with a placeholder model to apply them.
        try:
            self.to_engine_config(model="<unresolved>", default_num_threads=1)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_engine_config(self, model: str, default_num_threads: int) -> EngineConfig:
        values = dataclasses.asdict(self)
        if values["num_threads"] is None:
            values["num_threads"] = default_num_threads
        return EngineConfig(model=model, **values)


@dataclass(frozen=True)
class WorkerPoolConfig:
    """A set of identical workers of one role, each a Ray actor with these resources."""

    role: str  # "prefill" | "decode"; set by the loader from the section name
    count: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    host: str = "127.0.0.1"  # gRPC and metrics bind address; 0.0.0.0 advertises the node IP
    engine: EngineSettings = field(default_factory=EngineSettings)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ConfigError(f"worker role must be prefill or decode, got {self.role!r}")
        minimum = 0 if self.role == "prefill" else 1
        if self.count < minimum:
            hint = " (0 = colocated: decode workers prefill)" if self.role == "prefill" else ""
            raise ConfigError(f"{self.role}.count must be >= {minimum}{hint}, got {self.count}")
        if self.num_cpus <= 0:
            raise ConfigError(f"{self.role}.num_cpus must be > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError(f"{self.role}.num_gpus must be >= 0, got {self.num_gpus}")
        if not self.host:
            raise ConfigError(f"{self.role}.host must not be empty")

    def engine_config(self, model_dir: str) -> EngineConfig:
        """The EngineConfig for one worker of this pool, torch threads from num_cpus."""
        return self.engine.to_engine_config(model_dir, default_num_threads=max(1, int(self.num_cpus)))


@dataclass(frozen=True)
class RouterSection:
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0 = any free port
    grpc_port: int = 50051  # 0 = any free port
    request_timeout_s: float = 300.0
    max_inflight_requests: int = 1024  # beyond this the router answers 429 / RESOURCE_EXHAUSTED
    num_cpus: float = 1.0
    api_keys_file: str | None = None  # one key per line; None = the public API is open
    routing_policy: str = "kv_aware"  # or round_robin (prefix-blind, a baseline)
    disaggregation: str = "auto"  # or always: every prompt through a prefill worker when one is up
    local_prefill_max_tokens: int = 128  # an uncached suffix this short is prefilled on decode

    def routing(self) -> RoutingPolicy:
        return RoutingPolicy(policy=self.routing_policy, disaggregation=self.disaggregation,
                             local_prefill_max_tokens=self.local_prefill_max_tokens)

    def __post_init__(self) -> None:
        try:
            self.routing()
        except ValueError as exc:
            raise ConfigError(f"router.{exc}") from None
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"router.{name} must be in [0, 65535] (0 = any free port), got {port}")
        if self.http_port and self.http_port == self.grpc_port:
            raise ConfigError(
                f"router.http_port and router.grpc_port must differ, both are {self.http_port}"
            )
        if self.request_timeout_s <= 0:
            raise ConfigError(f"router.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_inflight_requests <= 0:
            raise ConfigError(
                f"router.max_inflight_requests must be > 0, got {self.max_inflight_requests}")
        if self.num_cpus <= 0:
            raise ConfigError(f"router.num_cpus must be > 0, got {self.num_cpus}")
        if not self.host:
            raise ConfigError("router.host must not be empty")


@dataclass(frozen=True)
class KVTransferSection:
    """How prefill workers send KV to decode workers."""

    compression: str = "none"  # none | int8 (lossy: greedy output may differ from none's)
    shared_memory: bool = True  # same-host decode workers: through shared memory (none only)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"kvtransfer.compression must be one of {', '.join(COMPRESSIONS)}, "
                f"got {self.compression!r}"
            )


@dataclass(frozen=True)
class TLSSection:
    """Mutual TLS between the components (baton/cluster_tls.py); off unless all three files."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str = DEFAULT_SERVER_NAME  # the DNS name in every component's certificate

    def __post_init__(self) -> None:
        files = (self.ca_file, self.cert_file, self.key_file)
        if any(files) and not all(files):
            raise ConfigError("tls needs ca_file, cert_file and key_file together (or none)")
        try:
            self.cluster_tls()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def cluster_tls(self) -> ClusterTLS | None:
        if not self.ca_file:
            return None
        return ClusterTLS(self.ca_file, self.cert_file, self.key_file,  # type: ignore[arg-type]
                          self.server_name)


@dataclass(frozen=True)
class ClusterConfig:
    model: str = DEFAULT_MODEL
    model_cache_dir: str | None = None  # None = ~/.cache/baton/models
    prefill: WorkerPoolConfig = field(default_factory=lambda: WorkerPoolConfig(role="prefill"))
    decode: WorkerPoolConfig = field(default_factory=lambda: WorkerPoolConfig(role="decode"))
    router: RouterSection = field(default_factory=RouterSection)
    kvtransfer: KVTransferSection = field(default_factory=KVTransferSection)
    tls: TLSSection = field(default_factory=TLSSection)
    redis_url: str | None = None  # None = an embedded redis-server on a free loopback port
    ray_address: str | None = None  # None = a local Ray runtime
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a model, a .gguf file or an HF directory")
        if self.prefill.role != "prefill" or self.decode.role != "decode":
            raise ConfigError("the prefill and decode sections must have roles prefill and decode")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if self.heartbeat_interval_s <= 0:
            raise ConfigError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.lease_ttl_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"lease_ttl_s ({self.lease_ttl_s}) must be at least twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or one late heartbeat drops a healthy worker"
            )

    @property
    def num_requested_cpus(self) -> float:
        return (
            self.prefill.count * self.prefill.num_cpus
            + self.decode.count * self.decode.num_cpus
            + self.router.num_cpus
        )

    @property
    def num_requested_gpus(self) -> float:
        return self.prefill.count * self.prefill.num_gpus + self.decode.count * self.decode.num_gpus


# ---- loading ----------------------------------------------------------------------------------

_SIZE_KEYS = {"kv_cache_memory_bytes"}
_LOADER_SET = {"role"}  # fields the loader fills in, not the user


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in _LOADER_SET}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one YAML value against a field's type."""
    if key.rsplit(".", 1)[-1] in _SIZE_KEYS:
        return parse_size(value, key)
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise AssertionError(f"unhandled config type {tp} for {key}")  # a bug in this module


def _build(cls: type, raw: Any, prefix: str, **fixed: Any) -> Any:
    where = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    fields = _fields(cls)
    values: dict[str, Any] = dict(fixed)
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys in {where}: {', '.join(sorted(fields))}"
            )
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, key, **_fixed_for(tp, name))
        else:
            values[name] = _coerce(value, tp, key)
    for name, tp in fields.items():  # sections left out still need their role
        if name not in values and dataclasses.is_dataclass(tp) and _fixed_for(tp, name):
            values[name] = tp(**_fixed_for(tp, name))
    try:
        return cls(**values)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}: {e}") from None
        raise


def _fixed_for(tp: type, name: str) -> dict[str, Any]:
    return {"role": name} if tp is WorkerPoolConfig else {}


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def config_from_dict(raw: Any) -> ClusterConfig:
    """A ClusterConfig from already-parsed YAML (a dict); raises ConfigError."""
    return _build(ClusterConfig, raw, "")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Read the YAML file at `path` (None = defaults only), apply `overrides`, validate.

    overrides: dotted keys ("model", "prefill.count", "router.http_port") to values; None values
    are skipped, so CLI flags that were not given leave the file's values alone.
    """
    raw: Any = {}
    if path is not None:
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise
