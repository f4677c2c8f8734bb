"""Tiny random models for engine tests, built in memory (no files), seeded."""

from __future__ import annotations

from typing import Any

import torch

from services.engine.models.attention import DenseBackend
from services.engine.models.causal_lm import CausalLM
from services.models.config import ModelConfig


def mimo_dict(window: int = 8, vocab: int = 256, layers: int = 4, **over: Any) -> dict[str, Any]:
    pattern = [0, 1, 1, 0, 1, 1, 1, 1][:layers]
    d: dict[str, Any] = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": layers,
        "hybrid_layer_pattern": pattern,
        "moe_layer_freq": [0] + [1] * (layers - 1),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "head_dim": 16,
        "v_head_dim": 8,
        "swa_head_dim": 16,
        "swa_v_head_dim": 8,
        "sliding_window_size": window,
        "sliding_window": window,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "partial_rotary_factor": 0.5,
        "rope_theta": 1_000_000.0,
        "swa_rope_theta": 10_000.0,
        "layernorm_epsilon": 1e-5,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "eos_token_id": vocab - 1,
        "tie_word_embeddings": False,
    }
    d.update(over)
    return d


def llama_dict(vocab: int = 256, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        "max_position_embeddings": 4096,
        "eos_token_id": vocab - 1,
        "tie_word_embeddings": True,
    }
    d.update(over)
    return d


def random_model(raw: dict[str, Any], seed: int = 0) -> CausalLM:
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.08))
    return model.eval()


@torch.inference_mode()
def reference_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position, from one full-sequence forward with no cache reuse."""
    backend = DenseBackend()
    positions = backend.schedule([(0, len(ids))])
    hidden = model(torch.tensor(ids), positions, backend)
    return model.compute_logits(hidden).float()


def reference_greedy(model: CausalLM, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Greedy continuation by re-running the whole sequence for every token."""
    ids, out = list(prompt), []
    for _ in range(n):
        tok = int(reference_logits(model, ids)[-1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out
