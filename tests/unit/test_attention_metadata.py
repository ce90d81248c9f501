"""AttentionMetadata.build: positions, slots, masks and padding for a mixed batch (CPU tensors)."""

import pytest
import torch

from engine.models.attention import AttentionMetadata

pytestmark = pytest.mark.unit


def test_mixed_batch_layout():
    # Two decodes (contexts 5 and 17), then prefill chunks of 3 (positions 4..6) and 2 (0..1).
    meta = AttentionMetadata.build(
        query_lens=[1, 1, 3, 2],
        context_lens=[5, 17, 7, 2],
        block_tables=[[3], [0, 1, 2], [7], [4]],
        block_size=8,
        device=torch.device("cpu"),
    )
    assert meta.num_single == 2
    assert meta.positions.tolist() == [4, 16, 4, 5, 6, 0, 1]
    # position p of a sequence sits in block_table[p // 8], row p % 8
    assert meta.slot_mapping.tolist() == [3 * 8 + 4, 2 * 8 + 0, 7 * 8 + 4, 61, 62, 4 * 8, 33]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 5, 7]
    assert meta.block_tables.tolist() == [[3, 0, 0], [0, 1, 2], [7, 0, 0], [4, 0, 0]]  # padded with 0
    # single-token mask: keys < context, width rounded up to whole blocks (17 -> 24)
    assert meta.single_mask.shape == (2, 1, 1, 24)
    assert meta.single_mask[0, 0, 0].tolist() == [True] * 5 + [False] * 19
    assert meta.single_mask[1, 0, 0].sum() == 17
    # multi-token: causal by position, padded to the longest query (3), padding rows see key 0
    assert meta.multi_max_query_len == 3
    assert meta.multi_pad_index.tolist() == [0, 1, 2, 3, 4]
    mask = meta.multi_mask[:, 0]
    assert mask.shape == (2, 3, 8)
    assert [row.sum().item() for row in mask[0]] == [5, 6, 7]
    assert [row.sum().item() for row in mask[1]] == [1, 2, 1]


def test_single_token_sequences_must_come_first():
    with pytest.raises(ValueError, match="first"):
        AttentionMetadata.build([2, 1], [2, 1], [[0], [1]], 8, torch.device("cpu"))


def test_the_single_token_mask_is_built_only_when_read_and_then_kept():
    meta = AttentionMetadata.build([1, 1], [3, 9], [[0], [1, 2, 3]], 4, torch.device("cpu"))
    assert meta._single_mask is None  # the CPU decode kernel never reads it
    mask = meta.single_mask
    assert mask.shape == (2, 1, 1, 12) and meta.single_mask is mask  # once for all layers
    assert mask[:, 0, 0].sum(-1).tolist() == [3, 9]
    prefill = AttentionMetadata.build([3], [3], [[0]], 4, torch.device("cpu"))
    assert prefill.single_mask is None
