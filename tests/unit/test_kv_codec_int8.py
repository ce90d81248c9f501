"""int8 KV chunks: error bound, bytes on the wire, and refusal of bad headers, scales and bytes."""

from __future__ import annotations

import struct

import grpc
import pytest
import torch

from kvtransfer import quant
from kvtransfer.codec import (
    ChunkError,
    ChunkErrorReason,
    KVGeometry,
    checksum,
    chunk_num_bytes,
    decode_chunk,
    encode_chunk,
)
from kvtransfer.compression import check_compression
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import iter_chunks

pytestmark = pytest.mark.unit

# SmolLM2-135M's KV geometry per layer: 3 KV heads x 64
GEOM = KVGeometry(num_layers=2, num_kv_heads=3, head_dim=64, dtype=torch.float32)


def kv(num_layers: int, num_tokens: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_tokens, GEOM.num_kv_heads, GEOM.head_dim)
    # a spread of magnitudes across tokens and heads, as real K/V have
    scale = torch.rand(num_layers, num_tokens, GEOM.num_kv_heads, 1, generator=g) * 8
    return tuple((torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(2))


def expanded_scales(chunk, layer_count: int, num_tokens: int) -> torch.Tensor:
    """The chunk's scales per token: [2, layers, tokens, heads, 1]."""
    groups = quant.num_groups(num_tokens, chunk.scale_block_tokens)
    scales = torch.frombuffer(bytearray(chunk.scales), dtype=torch.float32)
    scales = scales.view(2, layer_count, groups, GEOM.num_kv_heads)
    return scales[:, :, torch.arange(num_tokens) // chunk.scale_block_tokens, :, None]


@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_error_is_at_most_half_a_scale_step(num_tokens, dtype):
    k, v = kv(2, num_tokens, dtype)
    chunk = encode_chunk("t", 0, 0, 3, k, v, compression="int8", scale_block_tokens=16)
    k2, v2 = decode_chunk(chunk, KVGeometry(2, 3, 64, dtype), 0, 100)
    assert k2.dtype == v2.dtype == dtype
    step = expanded_scales(chunk, 2, num_tokens)
    for i, (x, y) in enumerate(((k, k2), (v, v2))):
        error = (x.float() - y.float()).abs()
        # the dequantized float32 value is rounded once more to dtype on the way out
        bound = step[i] / 2 + x.float().abs() * torch.finfo(dtype).eps + 1e-6
        assert (error <= bound).all()
        assert error.max() > 0  # it is lossy: this test would notice an uncompressed payload


def test_scale_is_the_group_max_over_127_per_layer_group_and_head():
    k, v = kv(2, 20)
    chunk = encode_chunk("t", 0, 0, 0, k, v, compression="int8", scale_block_tokens=16)
    scales = torch.frombuffer(bytearray(chunk.scales), dtype=torch.float32).view(2, 2, 2, 3)
    assert torch.allclose(scales[0, :, 0], k[:, :16].abs().amax(dim=(1, 3)) / 127)
    assert torch.allclose(scales[1, :, 1], v[:, 16:].abs().amax(dim=(1, 3)) / 127)  # short group


@pytest.mark.parametrize("num_tokens", [16, 64, 682])
def test_bytes_on_the_wire_count_the_scales(num_tokens):
    k, v = kv(1, num_tokens)
    chunk = encode_chunk("t", 0, 0, 0, k, v, compression="int8")
    raw32 = 2 * k.numel() * 4
    assert len(chunk.payload) == 2 * k.numel()
    assert len(chunk.scales) == 2 * quant.num_groups(num_tokens, 16) * 3 * 4
    assert chunk_num_bytes(chunk) <= 0.3 * raw32
    assert chunk_num_bytes(chunk) <= 0.55 * (raw32 // 2)  # bfloat16 KV
    plain = encode_chunk("t", 0, 0, 0, k, v)
    assert chunk_num_bytes(plain) == raw32 and plain.compression == "" and not plain.scales


def test_an_all_zero_group_has_scale_zero_and_decodes_to_zeros():
    k, v = kv(1, 32)
    k[:, :16] = 0
    chunk = encode_chunk("t", 0, 0, 0, k, v, compression="int8")
    scales = torch.frombuffer(bytearray(chunk.scales), dtype=torch.float32).view(2, 1, 2, 3)
    assert (scales[0, 0, 0] == 0).all() and (scales[0, 0, 1] > 0).all()
    k2, _ = decode_chunk(chunk, KVGeometry(1, 3, 64, torch.float32), 0, 32)
    assert torch.equal(k2[:, :16], torch.zeros_like(k2[:, :16]))
    assert not torch.isnan(k2).any()


def test_non_finite_kv_is_refused_by_the_sender():
    k, v = kv(1, 4)
    k[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        encode_chunk("t", 0, 0, 0, k, v, compression="int8")


@pytest.mark.parametrize("compression, scale_block_tokens, words", [
    ("fp8", 16, ["compression", "none, int8", "'fp8'"]),
    ("int8", 0, ["scale_block_tokens", ">= 1", "0"]),
])
def test_sender_settings_are_checked(compression, scale_block_tokens, words):
    with pytest.raises(ValueError) as err:
        check_compression(compression, scale_block_tokens)
    for word in words:
        assert word in str(err.value)
    k, v = kv(1, 4)
    with pytest.raises(ValueError):
        encode_chunk("t", 0, 0, 0, k, v, compression=compression,
                     scale_block_tokens=scale_block_tokens)


def _flip_first_scale_bit(chunk):
    chunk.scales = bytes([chunk.scales[0] ^ 1]) + chunk.scales[1:]


def _negative_scale(chunk):
    (value,) = struct.unpack("<f", chunk.scales[:4])
    chunk.scales = struct.pack("<f", -value) + chunk.scales[4:]


@pytest.mark.parametrize("mutate, reason", [
    (lambda c: setattr(c, "payload", bytes([c.payload[0] ^ 1]) + c.payload[1:]),
     ChunkErrorReason.CHECKSUM),
    (_flip_first_scale_bit, ChunkErrorReason.CHECKSUM),
    (lambda c: setattr(c, "scales", c.scales[:-4]), ChunkErrorReason.BAD_SHAPE),
    (lambda c: setattr(c, "scales", c.scales + bytes(4)), ChunkErrorReason.BAD_SHAPE),
    (lambda c: setattr(c, "scales", b""), ChunkErrorReason.BAD_SHAPE),
    (lambda c: setattr(c, "payload", c.payload[:-1]), ChunkErrorReason.BAD_SHAPE),
    (lambda c: setattr(c, "compression", "int4"), ChunkErrorReason.BAD_COMPRESSION),
    (lambda c: setattr(c, "scale_block_tokens", 0), ChunkErrorReason.BAD_COMPRESSION),
    (lambda c: setattr(c, "scale_block_tokens", -16), ChunkErrorReason.BAD_COMPRESSION),
    # another group size implies another number of scales
    (lambda c: setattr(c, "scale_block_tokens", 8), ChunkErrorReason.BAD_SHAPE),
    # read as uncompressed, it still names a group size; without it, the payload is a quarter
    # of the implied size
    (lambda c: setattr(c, "compression", "none"), ChunkErrorReason.BAD_COMPRESSION),
    (lambda c: (setattr(c, "compression", ""), setattr(c, "scale_block_tokens", 0)),
     ChunkErrorReason.BAD_SHAPE),
])
def test_bad_int8_chunks_are_refused_before_any_tensor_is_built(mutate, reason, monkeypatch):
    k, v = kv(2, 20)
    chunk = encode_chunk("t", 0, 0, 4, k, v, compression="int8")
    mutate(chunk)
    built = []
    monkeypatch.setattr(torch, "frombuffer", lambda *a, **kw: built.append(a))
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, GEOM, 0, 100)
    assert info.value.reason is reason
    assert built == []


def test_scales_that_pass_the_checksum_must_still_be_finite_and_non_negative():
    k, v = kv(1, 20)
    chunk = encode_chunk("t", 0, 0, 0, k, v, compression="int8")
    _negative_scale(chunk)
    chunk.crc32c = checksum(chunk.payload, chunk.scales)  # a sender bug, not a corruption
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, GEOM, 0, 20)
    assert info.value.reason is ChunkErrorReason.BAD_COMPRESSION


def test_uncompressed_chunk_with_scales_is_refused():
    k, v = kv(1, 4)
    chunk = encode_chunk("t", 0, 0, 0, k, v)
    chunk.scale_block_tokens = 16
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, GEOM, 0, 4)
    assert info.value.reason is ChunkErrorReason.BAD_COMPRESSION
    chunk = encode_chunk("t", 0, 0, 0, k, v)
    chunk.scales = bytes(4)
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, GEOM, 0, 4)
    assert info.value.reason is ChunkErrorReason.BAD_SHAPE


class _Context:
    def abort(self, code, details):
        raise grpc.RpcError(details)


def _int8_chunks(k, v, transfer_id: str, num_tokens: int):
    return list(iter_chunks(
        transfer_id=transfer_id, attempt=0, geometry=GEOM, token_start=0, token_end=num_tokens,
        read_kv=lambda l0, l1, t0, t1: (k[l0:l1, t0:t1], v[l0:l1, t0:t1]),
        first_token_id=9, chunk_bytes=40 * GEOM.bytes_per_token_layer, compression="int8",
    ))


def test_receiver_takes_int8_chunks_and_a_bad_one_fails_only_its_transfer():
    num_tokens = 100
    k, v = kv(GEOM.num_layers, num_tokens)
    written = {rid: torch.zeros(2, *k.shape) for rid in ("good", "bad")}
    completed, failed, num_bytes = [], [], []

    def write(rid, l0, l1, t0, t1, k_part, v_part):
        written[rid][0, l0:l1, t0:t1], written[rid][1, l0:l1, t0:t1] = k_part, v_part

    rx = KVReceiver(GEOM, write=write, on_complete=lambda rid, tok: completed.append((rid, tok)),
                    on_failed=lambda rid, err: failed.append((rid, err.reason)),
                    on_bytes=num_bytes.append)
    rx.expect("t-good", "good", 0, num_tokens)
    rx.expect("t-bad", "bad", 0, num_tokens)
    good = _int8_chunks(k, v, "t-good", num_tokens)
    bad = _int8_chunks(k, v, "t-bad", num_tokens)
    with_kv = [c for c in good if c.payload]
    assert len(with_kv) == 3 * GEOM.num_layers and all(c.compression == "int8" for c in with_kv)
    _flip_first_scale_bit([c for c in bad if c.payload][1])
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(bad), _Context())
    num_bad_writes = len(num_bytes)
    ack = rx.Push(iter(good), _Context())
    assert failed == [("bad", ChunkErrorReason.CHECKSUM)]
    assert completed == [("good", 9)]
    assert ack.num_bytes == sum(chunk_num_bytes(c) for c in good) == sum(num_bytes[num_bad_writes:])
    assert ack.num_bytes <= 0.3 * 2 * k.numel() * 4
    assert torch.allclose(written["good"][0], k, atol=float(k.abs().max()) / 127)
    assert torch.allclose(written["good"][1], v, atol=float(v.abs().max()) / 127)
    rx.close()
