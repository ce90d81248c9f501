"""baton.wire's SamplingParams conversion (field by field, by name) and the SDK's request: real
values cross the wire exactly (doubles), unset optional fields read back as the defaults."""

from __future__ import annotations

from dataclasses import fields

import pytest

from baton.client import GenerateOptions, _request
from baton.v1 import common_pb2, generation_pb2
from baton.wire import sampling_from_proto, sampling_to_proto
from engine.request import SamplingParams

pytestmark = pytest.mark.unit

REAL = {"temperature": 1.3, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": -1.7,
        "repetition_penalty": 1e-46, "min_p": 0.07}


def over_the_wire(msg):
    return type(msg).FromString(msg.SerializeToString())


def test_the_proto_mirrors_the_dataclass() -> None:
    assert ([f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields]
            == [f.name for f in fields(SamplingParams)])


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(top_k=5, seed=2**63 - 1, max_tokens=7, ignore_eos=True,
                   stop_token_ids=(3, 9), logprobs=0, **REAL),
    SamplingParams(temperature=0.0, top_p=0.3),
    SamplingParams(seed=0, logprobs=20, repetition_penalty=1.0000001),
])
def test_sampling_round_trip_is_exact(params) -> None:
    assert sampling_from_proto(over_the_wire(sampling_to_proto(params))) == params


def test_defaults_leave_optional_fields_unset() -> None:
    msg = sampling_to_proto(SamplingParams())
    assert [name for name in ("seed", "repetition_penalty", "logprobs") if msg.HasField(name)] == []
    assert msg.temperature == 1.0 and msg.top_p == 1.0  # plain fields are always sent


def test_sdk_request_carries_exact_values() -> None:
    req = over_the_wire(_request("Hi", None, None, model=None, request_id="r", top_k=3, seed=5,
                                 max_tokens=9, stop="END", stop_token_ids=[4], ignore_eos=True,
                                 logprobs=2, n=2, **REAL))
    assert isinstance(req, generation_pb2.GenerateRequest)
    assert {name: getattr(req, name) for name in REAL} == REAL
    assert (req.top_k, req.seed, req.max_tokens, list(req.stop), list(req.stop_token_ids),
            req.ignore_eos, req.logprobs, req.n) == (3, 5, 9, ["END"], [4], True, 2, 2)
    unset = _request(None, None, [1, 2], model=None, request_id=None, temperature=None)
    assert [f.name for f, _ in unset.ListFields()] == ["request_id", "token_ids"]
    assert set(GenerateOptions.__annotations__) <= set(generation_pb2.GenerateRequest.DESCRIPTOR
                                                        .fields_by_name)
    with pytest.raises(TypeError, match="tempreature"):
        _request("Hi", None, None, model=None, request_id=None, tempreature=0.5)
