"""engine.weights helpers that need no real model: name mapping, un-permutation, resolution."""

import numpy as np
import pytest

from engine.weights import gguf_tensor_name_to_hf, resolve_model, reverse_permute

pytestmark = pytest.mark.unit


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head, rows", [(4, 64), (1, 16), (3, 192)])
def test_reverse_permute_undoes_llama_cpp(n_head, rows):
    w = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    assert np.array_equal(reverse_permute(llama_cpp_permute(w, n_head), n_head), w)
    bias = np.arange(rows, dtype=np.float32)
    assert np.array_equal(reverse_permute(llama_cpp_permute(bias, n_head), n_head), bias)


@pytest.mark.parametrize(
    "gguf, hf",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.bias", "model.layers.12.self_attn.k_proj.bias"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj.weight"),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
        ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight"),
        ("blk.2.ffn_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
        ("rope_freqs.weight", None),
        ("blk.0.attn_rot_embd.weight", None),
    ],
)
def test_gguf_names_map_to_hf(gguf, hf):
    assert gguf_tensor_name_to_hf(gguf) == hf


def test_resolve_model_paths_and_errors(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(model_dir)) == model_dir
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        resolve_model("nope")
