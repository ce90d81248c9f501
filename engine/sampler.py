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
    # The sequence's sampler_state, where penalties keep running counts between steps (it must
    # always come with the same, growing token_ids); None: count token_ids afresh.
    state: dict[str, object] | None = None


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
        adjusted = _apply_penalties_(logits[index], [rows[i] for i in penalized])  # a copy
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
    return _apply_penalties_(logits.clone(memory_format=torch.contiguous_format), rows)


def _apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """apply_penalties in place on a contiguous logits [R, vocab]. Only the seen tokens' logits
    are read and written (a token never seen is left as is: x / 1, x * 1 and x - 0 are x)."""
    device, dtype = logits.device, logits.dtype
    vocab = logits.shape[1]
    flat = logits.view(-1)  # [R * vocab]
    states = [_penalty_state(row) for row in rows]
    for row, state in zip(rows, states):
        state.update(row.token_ids, row.num_prompt_tokens, device)

    def spread(values: list, lengths: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
        """[N]: each selected row's value repeated for each of its entries."""
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(
            lengths, output_size=total)

    def per_row(selected: list[int], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries' positions in flat ([N]), and each selected row's number of entries."""
        lengths = torch.tensor([t.numel() for t in ids], device=device)
        index = torch.cat(ids)  # [N] token ids
        offsets = spread([r * vocab for r in selected], lengths, index.numel(), torch.int64)
        return index + offsets, lengths

    repeated = [r for r, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeated:
        index, lengths = per_row(repeated, [states[r].seen_ids for r in repeated])
        penalty = spread([rows[r].params.repetition_penalty for r in repeated], lengths,
                         index.numel(), dtype)
        values = flat.index_select(0, index)  # index_select/index_copy_: advanced indexing is slow
        flat.index_copy_(0, index, torch.where(values > 0, values / penalty, values * penalty))
    counted = [r for r, row in enumerate(rows)
               if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0]
    if counted:
        index, lengths = per_row(counted, [states[r].output_ids for r in counted])
        counts = torch.cat([states[r].output_counts for r in counted]).to(dtype)  # [N], all > 0
        frequency = spread([rows[r].params.frequency_penalty for r in counted], lengths,
                           index.numel(), dtype)
        presence = spread([rows[r].params.presence_penalty for r in counted], lengths,
                          index.numel(), dtype)
        values = flat.index_select(0, index)
        flat.index_copy_(0, index, values - frequency * counts - presence)
    return logits


class PenaltyState:
    """One sequence's token statistics for penalties, kept between steps in its sampler_state and
    brought up to date with the tokens appended since the last call (token_ids only ever grows),
    so a step costs in proportion to its new tokens, not to the sequence's length:
        seen_ids       [S] int64, the distinct token ids of the prompt and the output;
        output_ids     [U] int64, the distinct output token ids;
        output_counts  [U] float32, how often each of them occurs in the output.
    """

    def __init__(self) -> None:
        self._reset(torch.device("cpu"), 0)

    def _reset(self, device: torch.device, num_prompt_tokens: int) -> None:
        self.num_tokens = 0  # leading tokens of token_ids counted so far
        self.num_prompt_tokens = num_prompt_tokens
        self._seen: set[int] = set()
        self._output_index: dict[int, int] = {}  # output token id -> its index in output_ids
        self.seen_ids = torch.empty(0, dtype=torch.int64, device=device)
        self.output_ids = torch.empty(0, dtype=torch.int64, device=device)
        self.output_counts = torch.empty(0, dtype=torch.float32, device=device)

    def update(self, token_ids: Sequence[int], num_prompt_tokens: int, device: torch.device) -> None:
        if (self.seen_ids.device != device or num_prompt_tokens != self.num_prompt_tokens
                or len(token_ids) < self.num_tokens):
            self._reset(device, num_prompt_tokens)  # not the tokens counted so far: recount
        start = self.num_tokens
        new_seen: list[int] = []
        if start < num_prompt_tokens:
            prompt_ids = set(token_ids[start:num_prompt_tokens]) - self._seen
            self._seen |= prompt_ids
            new_seen.extend(prompt_ids)
            start = num_prompt_tokens
        new_output: list[int] = []
        counted: list[int] = []  # the index in output_ids of each new output token
        for token_id in token_ids[start:]:
            if token_id not in self._seen:
                self._seen.add(token_id)
                new_seen.append(token_id)
            index = self._output_index.get(token_id)
            if index is None:
                index = self._output_index[token_id] = len(self._output_index)
                new_output.append(token_id)
            counted.append(index)
        self.num_tokens = len(token_ids)
        if new_seen:
            new_ids = torch.tensor(new_seen, dtype=torch.int64, device=device)
            self.seen_ids = torch.cat([self.seen_ids, new_ids])
        if new_output:
            new_ids = torch.tensor(new_output, dtype=torch.int64, device=device)
            self.output_ids = torch.cat([self.output_ids, new_ids])
            self.output_counts = torch.cat([
                self.output_counts, torch.zeros(len(new_output), device=device)])
        if counted:
            index = torch.tensor(counted, dtype=torch.int64, device=device)
            self.output_counts.index_add_(0, index, torch.ones(len(counted), device=device))


def _penalty_state(row: SamplingRow) -> PenaltyState:
    """The row's sequence's PenaltyState, made on first use; a fresh one for a row without state."""
    if row.state is None:
        return PenaltyState()
    state = row.state.get("penalties")
    if not isinstance(state, PenaltyState):
        state = row.state["penalties"] = PenaltyState()
    return state


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
