"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Parameter names follow the HF checkpoints minus the leading "model." (embed_tokens, layers.N.
self_attn.q_proj, ..., norm, lm_head), so a safetensors state dict loads with one rename.
The forward pass takes a flattened batch of tokens and an explicit AttentionMetadata; logits are
computed only for the rows the caller asks for (the last token of each sequence that samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models import cpu_kernels
from engine.models.attention import AttentionMetadata, paged_attention
from engine.models.layers import (
    SMALL_MAX_TOKENS,
    RMSNorm,
    apply_rope,
    make_linear,
    rope_cos_sin,
    rope_inv_freq,
)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, and Llama with attention_bias
    o_bias: bool  # Llama with attention_bias only

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> ModelArgs:
        is_qwen2 = config.architecture == "Qwen2ForCausalLM"
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            rope_scaling=config.rope_scaling,
            tie_word_embeddings=config.tie_word_embeddings,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias and not is_qwen2,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads, args.num_kv_heads, args.head_dim
        )
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # q, k and v in one matmul: the weight is read once per step instead of three times.
        self.qkv_proj = make_linear(args.dim, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = make_linear(self.q_size, args.dim, bias=args.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, dim]
        cos: torch.Tensor,  # [T, 1, head_dim]
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        # Rotate q and k together: one rope over [T, H + Hkv, D].
        qk = apply_rope(
            qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), cos, sin
        )
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, Hkv, D]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, k_cache, v_cache, meta)  # [T, H, D]
        return self.o_proj(o.view(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = make_linear(args.dim, 2 * args.intermediate_size)  # gate rows, then up
        self.down_proj = make_linear(args.intermediate_size, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, residual, cos, sin, k_cache, v_cache, meta):
        """x: the previous layer's MLP output, still to be added into the residual stream
        (residual is None at the first layer, where x is the embedding). Returns (mlp out, residual)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def kernel_weights(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> cpu_kernels.DecoderLayerWeights:
        """This layer's tensors for the CPU decode-layer kernel (LlamaModel.forward)."""
        attn, mlp = self.self_attn, self.mlp
        return cpu_kernels.CpuKernels.decoder_layer(
            self.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias,
            attn.o_proj.weight, attn.o_proj.bias, self.post_attention_layernorm.weight,
            mlp.gate_up_proj.weight, mlp.down_proj.weight, k_cache, v_cache,
        )


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # The checkpoint fills every weight: no random init (on the meta device, where the engine
        # builds the model, Embedding's normal_ alone loads torch's compiler stack: ~2 s).
        self.embed_tokens = nn.Embedding(
            args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)
        )
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = make_linear(args.dim, args.vocab_size)
        self.tie_weights()
        # Pointers to each layer's weights and pool for the CPU decode-layer kernel, keyed by
        # the pools': built on first use (~45 us a layer), dropped when weights are (re)set.
        self._kernel_layers: tuple[tuple[int, ...], list] | None = None
        self.register_buffer(
            "inv_freq",
            rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling),
            persistent=False,
        )

    def tie_weights(self) -> None:
        """Share lm_head with the embeddings when the config says so (again after to_empty)."""
        self._kernel_layers = None
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        k_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, Hkv, head_dim]
        v_caches: list[torch.Tensor],
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, dim]. on_layer(i), if given, is called after
        layer i (its K/V of this pass are in the pool by then)."""
        x = self.embed_tokens(input_ids)  # [T, dim]
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, x.dtype)  # [T, 1, head_dim]
        if (kernels := self._decode_layer_kernels(x, meta, k_caches[0])) is not None:
            return self._decode_with_kernels(kernels, x, cos, sin, meta, k_caches, v_caches,
                                             on_layer)
        residual = None
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.layers, k_caches, v_caches)):
            x, residual = layer(x, residual, cos, sin, k_cache, v_cache, meta)
            if on_layer is not None:
                on_layer(i)
        return self.norm(x, residual)[0]

    def _decode_layer_kernels(
        self, x: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor
    ) -> cpu_kernels.CpuKernels | None:
        """The CPU kernels when this pass can run each layer as one kernel call: every sequence
        has one new token (at most SMALL_MAX_TOKENS of them), float32 on the CPU, and the sizes
        the kernel's vector loops take."""
        args = self.args
        if (meta.multi_mask is not None or x.shape[0] > SMALL_MAX_TOKENS
                or x.device.type != "cpu" or x.dtype != torch.float32
                or k_cache.dtype != torch.float32 or args.head_dim % 8 or args.head_dim > 128
                or args.dim % 8 or args.intermediate_size % 8):
            return None
        return cpu_kernels.load()

    def _decode_with_kernels(self, kernels, x, cos, sin, meta, k_caches, v_caches, on_layer):
        """forward() for a batch of single-token sequences: one kernel call per layer (the same
        operations as DecoderLayer.forward, without a Python round trip between them)."""
        args = self.args
        batch, _keep_alive = kernels.decode_batch(
            dim=args.dim, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim, intermediate=args.intermediate_size, eps=args.norm_eps,
            cos=cos, sin=sin, slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
            context_lens=meta.context_lens, block_size=k_caches[0].shape[1],
        )
        key = tuple(cache.data_ptr() for cache in (*k_caches, *v_caches))
        if self._kernel_layers is None or self._kernel_layers[0] != key:
            self._kernel_layers = (key, [
                layer.kernel_weights(k_cache, v_cache)
                for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches)
            ])
        residual = x  # the embeddings, a fresh tensor: updated in place, layer by layer
        for i, layer_weights in enumerate(self._kernel_layers[1]):
            kernels.decode_layer(layer_weights, batch, residual)
            if on_layer is not None:
                on_layer(i)
        return self.norm(residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in; refuses missing, unexpected or misshapen ones.

        HF's separate q/k/v and gate/up projections fill row ranges of the fused ones.
        """
        self._kernel_layers = None
        targets = self._hf_targets()
        seen = set()
        for hf_name, tensor in state_dict.items():
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # some checkpoints store the tied copy too
            if name not in targets:
                raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
            param, row_start, row_end = targets[name]
            expected = (row_end - row_start, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}"
                )
            with torch.no_grad():
                param[row_start:row_end].copy_(tensor)
            seen.add(name)
        missing = set(targets) - seen
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")

    def _hf_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """HF parameter name (without "model.") -> (our parameter, first row, end row)."""
        args = self.args
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        inter = args.intermediate_size
        shards = {
            "self_attn.qkv_proj": [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv),
                                   ("self_attn.v_proj", q + kv, q + 2 * kv)],
            "mlp.gate_up_proj": [("mlp.gate_proj", 0, inter), ("mlp.up_proj", inter, 2 * inter)],
        }
        targets = {}
        for name, param in self.named_parameters():
            if name == "lm_head.weight" and args.tie_word_embeddings:
                continue
            module_name, _, kind = name.rpartition(".")  # "layers.3.mlp.gate_up_proj", "weight"
            for fused, parts in shards.items():
                if module_name.endswith(fused):
                    layer_prefix = module_name[: -len(fused)]
                    for hf_module, start, end in parts:
                        targets[f"{layer_prefix}{hf_module}.{kind}"] = (param, start, end)
                    break
            else:
                targets[name] = (param, 0, param.shape[0])
        return targets
