from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVChunk(_message.Message):
    __slots__ = ("transfer_id", "attempt", "layer_start", "layer_end", "token_start", "token_end", "dtype", "num_kv_heads", "head_dim", "payload", "crc32c", "last", "first_token_id", "compression", "scales", "scale_block_tokens", "ring")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    attempt: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    dtype: str
    num_kv_heads: int
    head_dim: int
    payload: bytes
    crc32c: int
    last: bool
    first_token_id: int
    compression: str
    scales: bytes
    scale_block_tokens: int
    ring: str
    def __init__(self, transfer_id: _Optional[str] = ..., attempt: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[str] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., last: _Optional[bool] = ..., first_token_id: _Optional[int] = ..., compression: _Optional[str] = ..., scales: _Optional[bytes] = ..., scale_block_tokens: _Optional[int] = ..., ring: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("num_bytes",)
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    def __init__(self, num_bytes: _Optional[int] = ...) -> None: ...

class RingCheck(_message.Message):
    __slots__ = ("ring",)
    RING_FIELD_NUMBER: _ClassVar[int]
    ring: str
    def __init__(self, ring: _Optional[str] = ...) -> None: ...

class RingCheckReply(_message.Message):
    __slots__ = ("ok", "detail")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
