"""Tiny tokenizers built in-process with `tokenizers` (no hub access), written as HF directories.

- byte_level_dir(): GPT-2 / SmolLM2 style byte-level BPE with ChatML special tokens and
  SmolLM2's chat template; no BOS added by encode.
- sentencepiece_dir(): Llama-2 style (Metaspace pieces, byte fallback, "<s>" added by the
  post-processor) with a template that writes bos_token itself and rejects non-alternating roles.

Both directories also hold a tiny Llama config.json (max_position_embeddings=MAX_MODEL_LEN) so
the router can read the model config from them. Builds are deterministic and cached per path.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_MODEL_LEN = 256

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Baton hands the KV cache from the prefill worker to the decode worker.",
    "Streaming tokens one by one, the router detokenizes incrementally.",
    "Ünïcödé: café, naïve, smörgåsbord, Straße, résumé, jalapeño.",
    "中文字符测试，你好世界。日本語のテキスト。한국어 텍스트.",
    "Emoji: 🙂 😀 🚀 🎉 👍🏽 and symbols like € £ ¥ © ® ™ ∞ ≠ ≤ ≥.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 and code: def f(x): return x * 2",
    "STOP here. Then continue. The end is near; the end is here.",
] * 3

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def _write_model_files(path: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_MODEL_LEN,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id}))


def byte_level_dir(path: str | Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE,
    }, indent=1))
    _write_model_files(path, tok.get_vocab_size(), tok.token_to_id("<|im_start|>"),
                       tok.token_to_id("<|im_end|>"))
    return path


def sentencepiece_dir(path: str | Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False, limit_alphabet=70,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as Llama's vocabulary has them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(raw))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": LLAMA2_TEMPLATE,
    }, indent=1))
    _write_model_files(path, tok.get_vocab_size(), bos, tok.token_to_id("</s>"))
    return path
