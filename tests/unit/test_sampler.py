"""Sampler: greedy, top-k, top-p, min-p, penalties, logprobs, and reproducibility from
(seed, output index) only."""

import pytest
import torch

from engine.request import InvalidRequestError, SamplingParams, TokenLogprob
from engine.sampler import SamplingRow, apply_penalties, derive_seed, sample, token_logprobs

pytestmark = pytest.mark.unit


def row(index=0, seed=1, token_ids=(), num_prompt_tokens=0, **kw):
    return SamplingRow(SamplingParams(**kw), seed=seed, output_index=index, token_ids=token_ids,
                       num_prompt_tokens=num_prompt_tokens)


def test_greedy_takes_the_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 0.0, 0.0]])
    assert sample(logits, [row(temperature=0), row(temperature=0)]) == [1, 0]


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [row(index=i, seed=i, temperature=2.0, top_k=1) for i in range(3)]
    assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    seen = {sample(logits, [row(index=i, temperature=5.0, top_k=2)])[0] for i in range(200)}
    assert seen == {0, 1}


def test_top_p_keeps_the_smallest_set_covering_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = {sample(logits, [row(index=i, temperature=1.0, top_p=0.7)])[0] for i in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    seen = {sample(logits, [row(index=i, temperature=1.0, top_p=0.1)])[0] for i in range(50)}
    assert seen == {0}


def test_seeded_sampling_depends_only_on_seed_and_index():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1000, generator=gen)
    other = torch.randn(3, 1000, generator=gen)
    alone = [sample(logits, [row(index=i, seed=42, temperature=1.0)])[0] for i in range(20)]
    # Same (seed, index) in a batch with other rows, in another position: same tokens.
    batched = []
    for i in range(20):
        rows = [row(index=7, seed=3, temperature=1.0), row(index=i, seed=42, temperature=1.0)]
        rows += [row(index=i, seed=9, temperature=0.5), row(temperature=0)]
        batched.append(sample(torch.cat([other[:1], logits, other[1:]]), rows)[1])
    assert alone == batched
    assert len(set(alone)) > 5  # it is actually random across indices
    different_seed = [sample(logits, [row(index=i, seed=43, temperature=1.0)])[0] for i in range(20)]
    assert different_seed != alone


def test_derive_seed_is_stable_and_in_range():
    assert derive_seed(42, 0) == derive_seed(42, 0)
    assert derive_seed(42, 0) != derive_seed(42, 1)
    assert 0 <= derive_seed(2**63 - 1, 10**6) < 2**63


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = [sample(logits, [row(index=i, temperature=0.05)])[0] for i in range(100)]
    assert set(cold) == {0}
    hot = [sample(logits, [row(index=i, temperature=50.0)])[0] for i in range(200)]
    assert set(hot) == {0, 1, 2}


# ---------------------------------------------------------------------------------- penalties

def test_frequency_and_presence_penalties_follow_the_formula_on_output_counts():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]])
    # Prompt [4, 4, 1]; output [1, 1, 2]: counts over the output only -> 1: 2, 2: 1.
    r = row(token_ids=[4, 4, 1, 1, 1, 2], num_prompt_tokens=3, temperature=0,
            frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits.clone(), [r])
    expected = torch.tensor([[1.0, 2.0 - 0.5 * 2 - 0.25, -1.0 - 0.5 * 1 - 0.25, 0.5, 3.0]])
    torch.testing.assert_close(got, expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_seen_anywhere():
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 1.0]])
    r = row(token_ids=[0, 1, 3], num_prompt_tokens=2, temperature=0, repetition_penalty=2.0)
    got = apply_penalties(logits.clone(), [r])
    # 0 and 1 in the prompt, 3 in the output; 2 and 4 never seen.
    torch.testing.assert_close(got, torch.tensor([[1.0, -4.0, 4.0, -2.0, 1.0]]))


def test_penalties_per_row_and_rows_without_them_untouched():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    rows = [row(token_ids=[1, 0], num_prompt_tokens=1, temperature=0, frequency_penalty=1.0),
            row(token_ids=[1, 0], num_prompt_tokens=1, temperature=0),
            row(token_ids=[0], num_prompt_tokens=1, temperature=0, repetition_penalty=1.5)]
    before = logits.clone()
    # Row 0 produced token 0 once: 3 - 1 < 2.9; row 1 has no penalty; row 2 saw 0 in its prompt.
    assert sample(logits, rows) == [1, 0, 1]
    assert torch.equal(logits, before)  # the raw logits are left for logprobs


def test_negative_penalties_encourage_repetition():
    logits = torch.tensor([[1.0, 1.5]])
    r = row(token_ids=[1, 0, 0], num_prompt_tokens=1, temperature=0, frequency_penalty=-0.5,
            presence_penalty=0.0)
    assert sample(logits, [r]) == [0]  # 1 + 0.5 * 2 = 2 > 1.5


# ---------------------------------------------------------------------------------- min_p

def test_min_p_keeps_tokens_at_least_that_fraction_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {sample(probs.log(), [row(index=i, temperature=1.0, min_p=0.5)])[0]
            for i in range(300)}
    assert seen == {0, 1}  # 0.3 >= 0.25, 0.15 < 0.25
    seen = {sample(probs.log(), [row(index=i, temperature=1.0, min_p=1.0)])[0] for i in range(50)}
    assert seen == {0}


# ---------------------------------------------------------------------------------- logprobs

def test_logprobs_are_log_softmax_of_the_raw_logits_with_sorted_alternatives():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=gen)
    rows = [row(temperature=0, logprobs=5, token_ids=[1, 2, 2], num_prompt_tokens=1,
                frequency_penalty=2.0),
            row(temperature=0),
            row(index=4, temperature=0.7, logprobs=0)]
    token_ids = sample(logits, rows)
    got = token_logprobs(logits, rows, token_ids)
    reference = logits.log_softmax(-1)
    assert got[1] is None
    for i in (0, 2):
        lp = got[i]
        assert isinstance(lp, TokenLogprob) and lp.token_id == token_ids[i]
        assert lp.logprob == pytest.approx(float(reference[i, token_ids[i]]), abs=1e-6)
    top = got[0].top
    assert len(top) == 5 and got[2].top == ()
    assert [t for t, _ in top] == reference[0].argsort(descending=True)[:5].tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    for t, v in top:
        assert v == pytest.approx(float(reference[0, t]), abs=1e-6)


def test_no_logprobs_asked_computes_nothing():
    logits = torch.randn(2, 10)
    rows = [row(temperature=0), row(temperature=1.0)]
    assert token_logprobs(logits, rows, sample(logits, rows)) is None


# ---------------------------------------------------------------------------------- batches

def test_seeded_rows_with_penalties_are_the_same_alone_and_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 100, generator=gen)
    others = torch.randn(3, 100, generator=gen)
    history = [3, 9, 9, 40, 41, 3]
    kw = {"seed": 11, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "min_p": 0.02,
              "presence_penalty": 0.7, "frequency_penalty": 0.3, "repetition_penalty": 1.2,
              "token_ids": history, "num_prompt_tokens": 2}
    alone = [sample(logits, [row(index=i, **kw)])[0] for i in range(15)]
    batched = []
    for i in range(15):
        rows = [row(temperature=0), row(index=i, **kw),
                row(index=2, seed=1, temperature=1.0, logprobs=3),
                row(temperature=0, repetition_penalty=3.0, token_ids=[1, 2], num_prompt_tokens=2)]
        batched.append(sample(torch.cat([others[:1], logits, others[1:]]), rows)[1])
    assert alone == batched
    assert len(set(alone)) > 3


@pytest.mark.parametrize("kw, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_p": 1.01}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
])
def test_bad_sampling_values_name_the_parameter_and_range(kw, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kw)
    assert info.value.param == param and param in str(info.value)


def test_penalty_state_kept_across_steps_gives_exactly_the_recomputed_logits():
    gen = torch.Generator().manual_seed(7)
    vocab = 50
    kw = {"temperature": 0, "presence_penalty": 0.7, "frequency_penalty": -0.3,
          "repetition_penalty": 1.3}
    token_ids = torch.randint(0, vocab, (12,), generator=gen).tolist()  # prompt
    state: dict = {}
    for step in range(20):
        logits = torch.randn(1, vocab, generator=gen) * 3
        kept = row(token_ids=token_ids, num_prompt_tokens=12, **kw)
        kept = SamplingRow(kept.params, 1, step, token_ids, 12, state)
        fresh = row(token_ids=list(token_ids), num_prompt_tokens=12, **kw)
        assert torch.equal(apply_penalties(logits, [kept]), apply_penalties(logits, [fresh]))
        assert sample(logits, [kept]) == sample(logits, [fresh])
        # the sampled token, or one from the prompt or earlier output: counts must add up
        token_ids.append(sample(logits, [fresh])[0] if step % 3 else token_ids[step % 12])
    counted = state["penalties"]
    assert counted.num_tokens == len(token_ids) - 1  # the last token is counted next step
    outputs = token_ids[12:-1]
    got = dict(zip(counted.output_ids.tolist(), counted.output_counts.tolist()))
    assert got == {t: float(outputs.count(t)) for t in set(outputs)}
    assert sorted(counted.seen_ids.tolist()) == sorted(set(token_ids[:-1]))


def test_penalty_state_recounts_tokens_it_did_not_count():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    state: dict = {}
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    apply_penalties(logits, [SamplingRow(params, 1, 0, [0, 2, 2], 1, state)])
    # Other tokens behind the same state (not a growing token_ids): counted afresh.
    got = apply_penalties(logits, [SamplingRow(params, 1, 0, [1, 1], 1, state)])
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0, 3.0]]))
