"""Cluster config: defaults, YAML, CLI overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cluster.config import (
    DEFAULT_MODEL,
    ClusterConfig,
    ConfigError,
    EngineSettings,
    KVTransferSection,
    WorkerPoolConfig,
    load_config,
    parse_size,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "baton.yaml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config(None, {})
    assert cfg == ClusterConfig()
    assert cfg.model == DEFAULT_MODEL == "smollm2-135m-instruct"
    assert (cfg.prefill.role, cfg.prefill.count) == ("prefill", 1)
    assert (cfg.decode.role, cfg.decode.count) == ("decode", 1)
    assert (cfg.router.host, cfg.router.http_port, cfg.router.grpc_port) == ("127.0.0.1", 8000, 50051)
    assert cfg.redis_url is None and cfg.ray_address is None
    assert cfg.heartbeat_interval_s == 2.0 and cfg.lease_ttl_s == 10.0
    assert cfg.kvtransfer.compression == "none"


def test_config_is_frozen():
    cfg = ClusterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "other"  # type: ignore[misc]


def test_yaml_file(tmp_path):
    path = write(tmp_path, """
model: /models/llama
prefill:
  count: 2
  num_cpus: 2
  engine:
    kv_cache_memory_bytes: 256MiB
    max_num_seqs: 8
decode:
  count: 3
  engine: {dtype: float32, num_threads: 3, enable_prefix_caching: false}
router: {http_port: 9000, request_timeout_s: 30}
redis_url: redis://10.0.0.1:6379/0
heartbeat_interval_s: 1
lease_ttl_s: 5
""")
    cfg = load_config(path, {})
    assert cfg.model == "/models/llama"
    assert cfg.prefill == WorkerPoolConfig(
        role="prefill", count=2, num_cpus=2.0,
        engine=EngineSettings(kv_cache_memory_bytes=256 * 2**20, max_num_seqs=8))
    assert cfg.decode.count == 3 and cfg.decode.engine.dtype == "float32"
    assert cfg.decode.engine.enable_prefix_caching is False
    assert cfg.decode.engine.to_engine_config("m", 1).enable_prefix_caching is False
    assert cfg.router.http_port == 9000 and cfg.router.grpc_port == 50051
    assert cfg.router.request_timeout_s == 30.0
    assert cfg.redis_url == "redis://10.0.0.1:6379/0"
    assert cfg.heartbeat_interval_s == 1.0 and cfg.lease_ttl_s == 5.0


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), {}) == ClusterConfig()


def test_overrides_beat_the_file_and_none_is_not_given(tmp_path):
    path = write(tmp_path, "model: from-file\nprefill: {count: 2}\nrouter: {http_port: 9000}\n")
    cfg = load_config(path, {
        "prefill.count": 0, "decode.count": 4, "router.grpc_port": 6000,
        "router.http_port": None, "model": None, "redis_url": "redis://127.0.0.1:1/0",
    })
    assert cfg.model == "from-file"  # None = flag not given
    assert cfg.router.http_port == 9000
    assert (cfg.prefill.count, cfg.decode.count, cfg.router.grpc_port) == (0, 4, 6000)
    assert cfg.redis_url == "redis://127.0.0.1:1/0"


def test_shipped_example_loads_and_lists_the_defaults():
    example = REPO / "deploy" / "baton.example.yaml"
    assert load_config(example, {}) == ClusterConfig()


def test_example_lists_every_key():
    import yaml

    raw = yaml.safe_load((REPO / "deploy" / "baton.example.yaml").read_text())

    def keys(cls, skip=("role",)):
        return {f.name for f in dataclasses.fields(cls)} - set(skip)

    assert set(raw) == keys(ClusterConfig)
    for role in ("prefill", "decode"):
        assert set(raw[role]) == keys(WorkerPoolConfig)
        assert set(raw[role]["engine"]) == keys(EngineSettings)
    assert set(raw["kvtransfer"]) == keys(KVTransferSection)


def test_engine_config_takes_threads_from_num_cpus():
    pool = WorkerPoolConfig(role="decode", num_cpus=2)
    assert pool.engine_config("/m").num_threads == 2
    assert pool.engine_config("/m").model == "/m"
    pinned = WorkerPoolConfig(role="decode", num_cpus=2, engine=EngineSettings(num_threads=1))
    assert pinned.engine_config("/m").num_threads == 1
    assert WorkerPoolConfig(role="decode", num_cpus=0.5).engine_config("/m").num_threads == 1


@pytest.mark.parametrize("text, words", [
    ("modle: x\n", ["'modle'", "valid keys", "model"]),
    ("prefill: {cout: 2}\n", ["'prefill.cout'", "count"]),
    ("decode: {engine: {kv_cache: 1}}\n", ["'decode.engine.kv_cache'", "kv_cache_memory_bytes"]),
    ("router: {port: 1}\n", ["'router.port'", "http_port"]),
    ("prefill: {role: decode}\n", ["'prefill.role'"]),
])
def test_unknown_key_is_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), {})
    message = str(err.value)
    assert "unknown config key" in message
    assert str(tmp_path / "baton.yaml") in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("overrides, words", [
    ({"decode.count": 0}, ["decode.count", ">= 1", "got 0"]),
    ({"prefill.count": -1}, ["prefill.count", ">= 0", "colocated"]),
    ({"prefill.num_cpus": 0}, ["prefill.num_cpus", "> 0"]),
    ({"decode.num_gpus": -1}, ["decode.num_gpus", ">= 0"]),
    ({"router.http_port": 70000}, ["router.http_port", "65535"]),
    ({"router.http_port": 7000, "router.grpc_port": 7000}, ["must differ", "7000"]),
    ({"router.request_timeout_s": 0}, ["router.request_timeout_s"]),
    ({"redis_url": "localhost:6379"}, ["redis_url", "redis://"]),
    ({"heartbeat_interval_s": 0}, ["heartbeat_interval_s", "> 0"]),
    ({"heartbeat_interval_s": 5, "lease_ttl_s": 6}, ["lease_ttl_s", "twice"]),
    ({"prefill.engine.dtype": "fp8"}, ["prefill.engine", "dtype", "fp8"]),
    ({"decode.engine.block_size": 12}, ["decode.engine", "block_size", "power of two"]),
    ({"decode.engine.max_num_seqs": 0}, ["decode.engine", "max_num_seqs"]),
    ({"decode.count": "two"}, ["decode.count", "integer", "'two'"]),
    ({"router.request_timeout_s": "soon"}, ["router.request_timeout_s", "number"]),
    ({"prefill.engine.kv_cache_memory_bytes": "lots"}, ["kv_cache_memory_bytes", "MiB", "'lots'"]),
    ({"model": ""}, ["model"]),
    ({"kvtransfer.compression": "fp8"}, ["kvtransfer.compression", "none, int8", "'fp8'"]),
])
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="prefill must be a mapping"):
        load_config(write(tmp_path, "prefill: 3\n"), {})


def test_top_level_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), {})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", {})


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "prefill: {count: [\n"), {})


def test_override_through_a_non_section(tmp_path):
    with pytest.raises(ConfigError, match="'model' is not a section"):
        load_config(None, {"model": "m", "model.x": 1})


@pytest.mark.parametrize("value, expected", [
    (1024, 1024), ("1024", 1024), ("512MiB", 512 * 2**20), ("1 GiB", 2**30), ("2GB", 2 * 10**9),
    ("1.5KiB", 1536), ("10b", 10),
])
def test_parse_size(value, expected):
    assert parse_size(value, "k") == expected


@pytest.mark.parametrize("value", ["", "MiB", "1 TiB", "-1", True, "1e3"])
def test_parse_size_refuses(value):
    with pytest.raises(ConfigError, match="k must be a number of bytes"):
        parse_size(value, "k")


def test_requested_resources():
    cfg = load_config(None, {"prefill.count": 2, "prefill.num_cpus": 2, "decode.count": 3,
                             "decode.num_gpus": 1})
    assert cfg.num_requested_cpus == 2 * 2 + 3 * 1 + 1  # + the router
    assert cfg.num_requested_gpus == 3


def test_kvtransfer_compression_from_yaml_and_flag(tmp_path):
    path = write(tmp_path, "kvtransfer: {compression: int8}\n")
    assert load_config(path, {}).kvtransfer == KVTransferSection(compression="int8")
    assert load_config(path, {"kvtransfer.compression": "none"}).kvtransfer.compression == "none"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "kvtransfer: {compresion: int8}\n"), {})
    assert "'kvtransfer.compresion'" in str(err.value) and "compression" in str(err.value)
