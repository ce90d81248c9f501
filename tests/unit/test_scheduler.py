"""Scheduler core (no torch): token budget, chunked prefill, admission, preemption, finishing."""

import pytest

from engine.block_pool import BlockPool
from engine.request import (
    FinishReason,
    InvalidRequestError,
    NoCapacityError,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from engine.scheduler import Scheduler
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

EOS = 99


def make(num_blocks=16, block_size=4, max_num_seqs=8, budget=32, max_model_len=64):
    pool = BlockPool(num_blocks)
    return Scheduler(
        pool, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget, max_model_len=max_model_len,
        eos_token_ids=frozenset([EOS]),
    )


def seq(request_id, num_prompt, prefill_only=False, **sampling):
    sampling.setdefault("max_tokens", 100)
    return Sequence(
        request_id=request_id, token_ids=list(range(1, num_prompt + 1)),
        num_prompt_tokens=num_prompt, sampling=SamplingParams(temperature=0, **sampling),
        seed=0, prefill_only=prefill_only,
    )


def plan(scheduled):
    return [(s.seq.request_id, s.num_new_tokens, s.samples) for s in scheduled]


def step(sched, tokens=None):
    """Schedule, then pretend the model sampled token 7 (or tokens[id]) for every sampler."""
    scheduled = sched.schedule()
    sampled = [(tokens or {}).get(s.seq.request_id, 7) if s.samples else None for s in scheduled]
    return plan(scheduled), sched.update(scheduled, sampled)


def test_prefill_is_chunked_by_the_token_budget():
    sched = make(budget=8)
    a = seq("a", 19)
    sched.add(a)
    assert step(sched)[0] == [("a", 8, False)]
    assert a.block_table == [0, 1] and a.num_computed_tokens == 8
    assert step(sched)[0] == [("a", 8, False)]
    got, outputs = step(sched)
    assert got == [("a", 3, True)]
    assert outputs == [RequestOutput("a", [7], None)]
    assert a.block_table == [0, 1, 2, 3, 4]
    assert step(sched)[0] == [("a", 1, True)]  # decode: the last sampled token
    assert a.output_token_ids == [7, 7]


def test_decodes_go_first_then_waiting_prompts_share_the_rest():
    sched = make(budget=10)
    sched.add(seq("a", 3))
    assert step(sched)[0] == [("a", 3, True)]
    sched.add(seq("b", 6))
    sched.add(seq("c", 6))
    # a decodes (1), b prefills fully (6), c gets the remaining 3 tokens
    assert step(sched)[0] == [("a", 1, True), ("b", 6, True), ("c", 3, False)]
    assert step(sched)[0] == [("a", 1, True), ("b", 1, True), ("c", 3, True)]


def test_max_num_seqs_holds_back_admission():
    sched = make(max_num_seqs=2)
    for name in "abc":
        sched.add(seq(name, 2))
    assert step(sched)[0] == [("a", 2, True), ("b", 2, True)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_admission_waits_for_blocks_in_fifo_order():
    sched = make(num_blocks=4, block_size=4, budget=64)
    sched.add(seq("a", 12))  # 3 blocks
    sched.add(seq("b", 8))  # 2 blocks: does not fit
    sched.add(seq("c", 1))  # would fit, but FIFO keeps it behind b
    assert step(sched)[0] == [("a", 12, True)]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_preemption_frees_the_latest_running_and_recomputes_it():
    sched = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq("a", 8), seq("b", 7)
    sched.add(a)
    sched.add(b)
    assert step(sched)[0] == [("a", 8, True), ("b", 7, True)]  # 4 blocks used
    # a (9 tokens) needs a third block: b is preempted and goes back to the head of waiting
    got, _ = step(sched)
    assert got == [("a", 1, True)]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and list(sched.waiting) == [b]
    assert a.block_table == [0, 1, 2]
    # when a finishes, b recomputes prompt + its output token, then samples its second token
    sched.abort("a")
    got, _outputs = step(sched)
    assert got == [("b", 8, True)]
    assert b.output_token_ids == [7, 7]


def test_a_sequence_that_can_never_fit_finishes_with_length():
    sched = make(num_blocks=2, block_size=4, budget=64)
    a = seq("a", 7)
    sched.add(a)
    step(sched)  # 8 tokens now, 2 blocks
    got, outputs = step(sched)  # computes the 8th token: still fits
    assert got == [("a", 1, True)]
    got, outputs = step(sched)  # the 9th token needs a third block that does not exist
    assert got == []
    assert outputs == [RequestOutput("a", [], FinishReason.LENGTH)]
    assert sched.block_pool.num_free_blocks == 2 and "a" not in sched.requests


@pytest.mark.parametrize(
    "sampling, tokens, reason, n",
    [
        ({"max_tokens": 3}, [5, 5, 5], FinishReason.LENGTH, 3),
        ({}, [5, EOS], FinishReason.STOP, 2),
        ({"ignore_eos": True, "max_tokens": 4}, [EOS, EOS, 5, 5], FinishReason.LENGTH, 4),
        ({"stop_token_ids": (42,)}, [5, 42], FinishReason.STOP, 2),
    ],
)
def test_finish_reasons(sampling, tokens, reason, n):
    sched = make()
    sched.add(seq("a", 3, **sampling))
    outputs = []
    for token in tokens:
        outputs += step(sched, {"a": token})[1]
    assert [o.new_token_ids[0] for o in outputs] == tokens[:n]
    assert outputs[-1].finish_reason == reason
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert sched.block_pool.num_free_blocks == 16 and not sched.running


def test_context_limit_finishes_with_length():
    sched = make(max_model_len=5)
    sched.add(seq("a", 3))
    assert step(sched)[1] == [RequestOutput("a", [7], None)]
    assert step(sched)[1] == [RequestOutput("a", [7], FinishReason.LENGTH)]  # 5 tokens


def test_prefill_only_is_held_until_release():
    sched = make()
    sched.add(seq("p", 5, prefill_only=True))
    _, outputs = step(sched)
    assert outputs == [RequestOutput("p", [7], None)]
    held = sched.held["p"]
    assert held.status == RequestStatus.FINISHED and held.block_table == [0, 1]
    assert not sched.running and step(sched)[0] == []
    sched.release("p")
    assert sched.block_pool.num_free_blocks == 16
    with pytest.raises(ValueError):
        sched.release("p")


def test_reserve_commit_joins_the_batch_without_recomputing_the_prompt():
    sched = make()
    d = seq("d", 6)
    sched.reserve(d)
    assert d.status == RequestStatus.WAITING_FOR_KV and d.block_table == [0, 1]
    assert step(sched)[0] == []
    sched.commit("d", 11)
    got, outputs = step(sched)
    assert got == [("d", 1, True)]  # only the first token, at position 6
    assert outputs == [RequestOutput("d", [7], None)]
    assert d.output_token_ids == [11, 7]


def test_commit_of_a_finished_first_token_reports_it_next_step():
    sched = make()
    sched.reserve(seq("d", 6, max_tokens=1))
    sched.commit("d", 11)
    assert step(sched) == ([], [RequestOutput("d", [], FinishReason.LENGTH)])
    assert sched.block_pool.num_free_blocks == 16


def test_reserve_without_room_raises_and_allocates_nothing():
    sched = make(num_blocks=3)
    sched.reserve(seq("a", 8))
    with pytest.raises(NoCapacityError):
        sched.reserve(seq("b", 8))
    assert sched.block_pool.num_free_blocks == 1 and "b" not in sched.requests


def test_prompts_larger_than_the_pool_and_duplicate_ids_are_refused():
    sched = make(num_blocks=2)
    with pytest.raises(InvalidRequestError, match="only 2 blocks"):
        sched.add(seq("a", 8))
    sched.add(seq("b", 3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add(seq("b", 3))


def test_abort_works_in_every_state_and_frees_blocks():
    sched = make(budget=4)
    sched.add(seq("run", 3))
    step(sched)
    sched.add(seq("wait", 3))
    sched.add(seq("chunk", 9))
    step(sched)  # run decodes, wait prefills, chunk gets nothing yet
    sched.reserve(seq("kv", 4))
    sched.add(seq("held", 1, prefill_only=True))
    for name in ("run", "wait", "chunk", "kv"):
        assert sched.abort(name)
    step(sched)
    assert "held" in sched.held
    assert sched.abort("held")
    assert not sched.abort("nobody")
    assert sched.block_pool.num_free_blocks == 16
    assert not (sched.running or sched.waiting or sched.reserved or sched.held or sched.requests)
