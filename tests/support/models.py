"""Tiny random models for tests: HF directories built locally (no hub), and the HF reference.

make_tiny_model(dir, arch=...) writes a transformers config + float32 safetensors (fixed torch
seed), a byte-level BPE tokenizer trained on a little built-in English text (tokenizer.json,
tokenizer_config.json with a chat template) and generation_config.json. Weights are drawn with a
large initializer_range, and norm weights and biases are randomized too, so logits are peaked
(greedy argmax has no near-ties, parity is not flaky) and every weight matters.

tiny_model(name) builds each preset once per test session (under a temporary directory removed at
exit); hf_generate_greedy(dir, prompt_ids, n) is the transformers reference.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A baton passes from one runner to the next.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Prefill workers compute the prompt, decode workers generate the answer one token at a time.
What is the capital of France? The capital of France is Paris. Hello, world! How are you today?
Large language models predict the next token. Serving them well needs batching and a cache.
One, two, three, four, five, six, seven, eight, nine, ten. The weather is sunny and warm.
"""

# name -> keyword arguments of make_tiny_model
TINY_MODELS: dict[str, dict] = {
    "llama-gqa": {"arch": "llama", "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": False},
    "llama-mha-tied": {"arch": "llama", "num_heads": 4, "num_kv_heads": 4, "tie_word_embeddings": True},
    "llama-mqa": {"arch": "llama", "num_heads": 4, "num_kv_heads": 1, "tie_word_embeddings": False},
    "qwen2-bias": {"arch": "qwen2", "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True},
    "mistral": {"arch": "mistral", "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": False},
}


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    """Train a byte-level BPE on TRAINING_TEXT; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write an HF model directory with random weights; returns its path."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    bos_id = tokenizer.token_to_id("<|im_start|>")
    eos_id = tokenizer.token_to_id("<|im_end|>")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(str(out_dir))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


@functools.cache
def _session_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="baton-tiny-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tiny_model(name: str) -> Path:
    """The preset TINY_MODELS[name], built once per test session."""
    return make_tiny_model(_session_root() / name, **TINY_MODELS[name])


@functools.lru_cache(maxsize=8)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def hf_generate_greedy(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(), float32, greedy, batch 1, EOS ignored: the new token ids."""
    model = _hf_model(str(model_dir))
    input_ids = torch.tensor([prompt_ids], dtype=torch.int64)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()
