"""Shared helpers for the model tests: tiny configs, random weights, our forward and greedy loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.engine.models.attention import DenseBackend
from services.engine.models.causal_lm import CausalLM

SEED = 1234


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


@torch.no_grad()
def prompt_logits(model: CausalLM, prompt: list[int]) -> torch.Tensor:
    """Logits of every prompt position, from one prefill on a fresh DenseBackend."""
    backend = DenseBackend()
    positions = backend.schedule([(0, len(prompt))])
    return model.compute_logits(model(torch.tensor(prompt), positions, backend))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float) -> None:
    """Every parameter and buffer random (norm weights near 1), so no path hides behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    named = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b.is_floating_point()
    ]
    for name, tensor in named:
        if "inv_freq" in name:
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("norm.weight"):
            tensor.copy_(1.0 + 0.1 * noise)
        elif name.endswith(("sinks", "attention_sink_bias")):
            tensor.copy_(noise)  # O(1) sinks: they take a visible share of the softmax
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(0.3 * noise)  # comparable to the spread of sigmoid scores: changes the choice
        else:
            tensor.copy_(std * noise)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def write_checkpoint(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def tiny_pro_config(**overrides: Any) -> dict[str, Any]:
    """A MiMo-V2.5-Pro-shaped hub config (8 KV heads on full and SWA layers, fused qkv), tiny."""
    config: dict[str, Any] = {
        "architectures": ["MiMoV2ForCausalLM"],
        "model_type": "mimo_v2",
        "vocab_size": 257,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 12,
        "v_head_dim": 8,
        "swa_num_attention_heads": 16,
        "swa_num_key_value_heads": 8,
        "swa_head_dim": 12,
        "swa_v_head_dim": 8,
        "hybrid_layer_pattern": [0, 1, 1, 0],
        "moe_layer_freq": [0, 1, 1, 1],
        "rope_theta": 5_000_000.0,
        "swa_rope_theta": 10_000.0,
        "partial_rotary_factor": 0.334,
        "sliding_window_size": 6,
        "sliding_window": 6,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": True,
        "attention_value_scale": 0.612,
        "attention_projection_layout": "fused_qkv",
        "layernorm_epsilon": 1e-5,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "eos_token_id": [1, 2],
    }
    config.update(overrides)
    return config
