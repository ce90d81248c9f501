"""RouterConfig validation and the router's error mapping."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.errors import ErrorKind, RouterError, from_worker_status

pytestmark = pytest.mark.unit


def test_defaults_are_valid() -> None:
    config = RouterConfig(model_name="m", model_dir="/models/m")
    assert (config.http_port, config.grpc_port) == (8000, 50051)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_name": ""}, "model_name must not be empty"),
    ({"model_dir": ""}, "model_dir must be an HF model directory"),
    ({"http_port": 70000}, r"http_port must be in \[0, 65535\]"),
    ({"grpc_port": -1}, r"grpc_port must be in \[0, 65535\]"),
    ({"http_port": 9000, "grpc_port": 9000}, "must differ"),
    ({"max_model_len": 1}, "max_model_len must be > 1"),
    ({"request_timeout_s": 0}, "request_timeout_s must be > 0"),
    ({"prefill_timeout_s": -1}, "prefill_timeout_s must be > 0"),
    ({"max_inflight_requests": 0}, "max_inflight_requests must be > 0"),
    ({"host": ""}, "host must not be empty"),
])
def test_invalid_config_names_the_field(kwargs, message) -> None:
    base = {"model_name": "m", "model_dir": "/models/m"}
    with pytest.raises(ValueError, match=message):
        RouterConfig(**{**base, **kwargs})


def test_port_zero_twice_is_fine() -> None:
    RouterConfig(model_name="m", model_dir="d", http_port=0, grpc_port=0)


@pytest.mark.parametrize("code, kind, status", [
    ("INVALID_ARGUMENT", ErrorKind.INVALID_REQUEST, 400),
    ("RESOURCE_EXHAUSTED", ErrorKind.OVERLOADED, 429),
    ("UNAVAILABLE", ErrorKind.UNAVAILABLE, 503),
    ("DEADLINE_EXCEEDED", ErrorKind.TIMEOUT, 504),
    ("INTERNAL", ErrorKind.INTERNAL, 500),
    ("DATA_LOSS", ErrorKind.INTERNAL, 500),
])
def test_worker_status_mapping(code, kind, status) -> None:
    err = from_worker_status(code, "details here", "decode")
    assert err.kind is kind and err.kind.http_status == status
    assert "details here" in err.message


def test_openai_shape_and_grpc_details() -> None:
    err = RouterError.invalid("must be >= 0, got -1", "temperature")
    assert err.to_openai() == {"error": {"message": "must be >= 0, got -1",
                                         "type": "invalid_request_error",
                                         "param": "temperature", "code": None}}
    assert err.grpc_details() == "temperature: must be >= 0, got -1"
    assert err.kind.grpc_code_name == "INVALID_ARGUMENT"
