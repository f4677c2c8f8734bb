"""The decoder: `CausalLM` for MiMo-V2 (hybrid SWA, sinks, MoE) and Llama-style models.

A forward takes the *new* tokens of a packed batch with their absolute positions; where the KV of
earlier tokens lives is the backend's business (attention_backend.py). Parameter names are the
Hugging Face checkpoint names (model.layers.N.self_attn.q_proj.weight, ...attention_sink_bias,
...mlp.gate.e_score_correction_bias, ...mlp.experts.E.gate_proj.weight, lm_head.weight), so
`state_dict()` keys are exactly what a checkpoint must hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.models.attention_backend import AttentionBackend, LayerAttn
from services.engine.models.moe import MoE, SwiGLU
from services.engine.models.rope import Rotary
from services.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        spec = config.attention(layer_id)
        self.spec = spec
        self.layer_id = layer_id
        self.window = config.layer_window(layer_id)
        self.value_scale = config.attention_value_scale
        self.rotary = Rotary.for_spec(spec)
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, spec.num_heads * spec.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, spec.num_kv_heads * spec.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, spec.num_kv_heads * spec.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.v_head_dim, hidden, bias=False)
        self.attention_sink_bias = nn.Parameter(torch.zeros(spec.num_heads)) if spec.has_sinks else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        t, spec = x.shape[0], self.spec
        q = self.q_proj(x).view(t, spec.num_heads, spec.head_dim)
        k = self.k_proj(x).view(t, spec.num_kv_heads, spec.head_dim)
        v = self.v_proj(x).view(t, spec.num_kv_heads, spec.v_head_dim)
        if self.value_scale != 1.0:
            v = v * self.value_scale  # before caching: the KV pools hold scaled values
        q, k = self.rotary.apply(q, k, positions)
        layer = LayerAttn(self.layer_id, self.window, self.attention_sink_bias, spec.scale)
        out = backend.attend(layer, q, k, v)
        return self.o_proj(out.reshape(t, spec.num_heads * spec.v_head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_id)
        self.mlp: nn.Module
        if config.is_moe[layer_id]:
            assert config.moe is not None
            self.mlp = MoE(config.hidden_size, config.moe)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def layer(self, layer_id: int) -> DecoderLayer:
        layer = self.layers[layer_id]
        assert isinstance(layer, DecoderLayer)
        return layer


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions [T] of the batch's new tokens, packed as backend.segments says -> hidden [T, H]."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must be [T]"
            )
        x = self.model.embed_tokens(input_ids)
        for layer_id in range(self.config.num_layers):
            x = self.model.layer(layer_id)(x, positions, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> logits [T, vocab], fp32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def to_dtype(self, dtype: torch.dtype) -> CausalLM:
        """Cast to `dtype`, except the router's expert-choosing tensors, which stay fp32."""
        self.to(dtype)
        for name, param in self.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
                param.data = param.data.float()
        return self
