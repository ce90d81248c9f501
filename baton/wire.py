"""Conversions between engine request types and baton.v1 messages, and gRPC settings shared by
every server and channel. Protobuf stops here: cores only see dataclasses.

SamplingParams converts field by field under the same names (baton.v1.SamplingParams mirrors the
dataclass; tests/unit/test_wire.py checks that the two field sets are equal): repeated fields are
tuples, and a field the proto marks `optional` is left unset when it holds the dataclass default,
which is what it reads back as.
"""

from __future__ import annotations

from dataclasses import fields

from baton.v1 import common_pb2
from engine.request import FinishReason, SamplingParams, TokenLogprob

# KV chunks are ~1 MiB; leave room for headers without accepting unbounded messages.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}

_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
_SAMPLING_DEFAULTS = SamplingParams()
_SAMPLING_OPTIONAL = frozenset(
    f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields if f.has_presence)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams()
    for name in _SAMPLING_FIELDS:
        value = getattr(params, name)
        if isinstance(value, tuple):
            getattr(msg, name).extend(value)
        elif name not in _SAMPLING_OPTIONAL or value != getattr(_SAMPLING_DEFAULTS, name):
            setattr(msg, name, value)
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Raises engine.request.InvalidRequestError for out-of-range values."""
    values = {}
    for name in _SAMPLING_FIELDS:
        if name in _SAMPLING_OPTIONAL and not msg.HasField(name):
            continue  # SamplingParams' default
        value = getattr(msg, name)
        repeated = isinstance(getattr(_SAMPLING_DEFAULTS, name), tuple)
        values[name] = tuple(value) if repeated else value
    return SamplingParams(**values)


def logprob_to_proto(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id, logprob=logprob.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
    )


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def finish_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO[value]
