"""Token sampling: penalties, greedy, temperature, top-k, top-p and min-p, reproducible per
request; log-probabilities of the sampled tokens and their most likely alternatives.

Order, as vLLM: repetition penalty (prompt + output tokens), frequency and presence penalties
(output tokens), then greedy rows take the argmax (ties go to the lowest id, as in transformers)
and random rows apply temperature, top-k, top-p and min-p before drawing. Random rows draw with a
torch.Generator seeded from (seed, i) only, where i is the index of the output token being
sampled: the same request gives the same tokens whatever it is batched with, after a preemption,
or when a prefill worker samples token 0 and a decode worker tokens 1.. . Penalties read only the
sequence's own tokens, so they keep that property.

Logprobs are log_softmax of the model's raw logits (before penalties and temperature), vLLM's
default. Every extra is computed only over the rows that ask for it: a batch of plain greedy rows
costs one argmax.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    seed: int  # the request's effective seed
    output_index: int  # index of the output token being sampled
    token_ids: Sequence[int] = ()  # prompt + outputs so far; read only for penalties
    num_prompt_tokens: int = 0


def derive_seed(seed: int, output_index: int) -> int:
    """A 63-bit generator seed that depends on (seed, output_index) only, stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [N, vocab] float32, one row per entry of rows (not modified). Returns N token ids."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sampling rows")
    penalized = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if penalized:
        index = torch.tensor(penalized, device=logits.device)
        adjusted = apply_penalties(logits[index], [rows[i] for i in penalized])
        logits = logits.index_put((index,), adjusted)  # a copy: the raw logits stay intact
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


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: [R, vocab]. Returns new logits with, per row,
    repetition: a token seen in the prompt or output has a positive logit divided by the penalty,
                a negative one multiplied by it;
    then logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0),
    count being the token's occurrences among the output tokens."""
    device = logits.device
    num_rows, vocab = logits.shape
    max_len = max(len(row.token_ids) for row in rows)
    # Padding points at an extra column `vocab`, dropped after the scatters.
    padded, is_output = [], []
    for row in rows:
        n, pad = len(row.token_ids), max_len - len(row.token_ids)
        padded.append(list(row.token_ids) + [vocab] * pad)
        is_output.append([0.0] * row.num_prompt_tokens + [1.0] * (n - row.num_prompt_tokens)
                         + [0.0] * pad)
    ids = torch.tensor(padded, dtype=torch.int64).to(device)  # [R, L]
    weights = torch.tensor(is_output, dtype=logits.dtype).to(device)  # [R, L]
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=device)
    counts = counts.scatter_add_(1, ids, weights)[:, :vocab]  # [R, vocab] output counts

    repetition = [row.params.repetition_penalty for row in rows]
    if any(p != 1.0 for p in repetition):
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, ids, True)[:, :vocab]  # [R, vocab] in prompt or output
        penalty = torch.tensor(repetition, dtype=logits.dtype, device=device)[:, None]
        penalty = torch.where(seen, penalty, torch.ones_like(penalty))  # [R, vocab]
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    frequency = torch.tensor([row.params.frequency_penalty for row in rows],
                             dtype=logits.dtype, device=device)[:, None]
    presence = torch.tensor([row.params.presence_penalty for row in rows],
                            dtype=logits.dtype, device=device)[:, None]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def token_logprobs(logits: torch.Tensor, rows: list[SamplingRow],
                   token_ids: list[int]) -> list[TokenLogprob | None] | None:
    """Logprobs of the sampled token_ids and each row's `params.logprobs` most likely tokens,
    from the raw logits [N, vocab]. None when no row asks (nothing is computed)."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return None
    device = logits.device
    logprobs = logits[torch.tensor(wanted, device=device)].log_softmax(dim=-1)  # [W, vocab]
    chosen = torch.tensor([token_ids[i] for i in wanted], dtype=torch.int64, device=device)
    chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0].tolist()  # [W]
    k = min(max(rows[i].params.logprobs for i in wanted), logprobs.shape[-1])
    top_ids: list[list[int]] = [[] for _ in wanted]
    top_logprobs: list[list[float]] = [[] for _ in wanted]
    if k > 0:
        values, indices = logprobs.topk(k, dim=-1)  # [W, k], most likely first
        top_ids, top_logprobs = indices.tolist(), values.tolist()
    result: list[TokenLogprob | None] = [None] * len(rows)
    for w, i in enumerate(wanted):
        n = rows[i].params.logprobs
        top = tuple(zip(top_ids[w][:n], top_logprobs[w][:n]))
        result[i] = TokenLogprob(token_ids[i], chosen_logprobs[w], top)
    return result


def _filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks, vectorized over rows. Returns
    probabilities (not renormalized after min-p; multinomial does not need it)."""
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
    probs = logits.softmax(dim=-1)
    if any(r.params.min_p > 0.0 for r in rows):
        # Keep tokens at least min_p times as likely as the most likely one (which always stays).
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype, device=device)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [R, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
