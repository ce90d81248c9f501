"""Token sampling: greedy, temperature, top-k and top-p, reproducible per request.

Greedy rows take the argmax of the float32 logits (ties go to the lowest id, as in transformers).
Random rows draw with a torch.Generator seeded from (seed, i) only, where i is the index of the
output token being sampled: the same request gives the same tokens whatever it is batched with,
after a preemption, or when a prefill worker samples token 0 and a decode worker tokens 1.. .
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.request import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    seed: int  # the request's effective seed
    output_index: int  # index of the output token being sampled


def derive_seed(seed: int, output_index: int) -> int:
    """A 63-bit generator seed that depends on (seed, output_index) only, stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [N, vocab] float32, one row per entry of rows. Returns N token ids."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sampling rows")
    token_ids = logits.argmax(dim=-1).tolist()
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random_rows:
        return token_ids
    probs = _filtered_probs(logits[random_rows], [rows[i] for i in random_rows])
    for r, i in enumerate(random_rows):
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(derive_seed(rows[i].seed, rows[i].output_index))
        token_ids[i] = int(torch.multinomial(probs[r], 1, generator=generator))
    return token_ids


def _filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k and top-p masks, vectorized over rows. Returns probabilities."""
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = torch.tensor(
        [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows], device=device
    )
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        remove = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_above >= top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
    return logits.softmax(dim=-1)
