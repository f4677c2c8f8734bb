"""MiMo-V2 geometries as hub-style `config.json` dicts.

Keys are spelled as in the published checkpoints (`hybrid_layer_pattern`: 0 = full attention,
1 = sliding window; `moe_layer_freq`: 0 = dense MLP, 1 = MoE; `sliding_window_size`: the window W,
tokens *before* the query; `swa_*`: the geometry of SWA layers). `mimo-tiny` is the project's own
test model and is the only preset ever instantiated with weights; the others are the real published
geometries, used for KV byte maths only.

transformers 5.23's `MiMoV2FlashConfig` reads only some hub keys: it turns `sliding_window_size: 128`
into `sliding_window = 129` (query + 128 previous), and gives SWA layers twice `num_key_value_heads`,
but it ignores `hybrid_layer_pattern`, `moe_layer_freq`, `rope_theta`/`swa_rope_theta` and
`layernorm_epsilon`, using its own defaults. `transformers_mirror` derives its native spellings
(`layer_types`, `mlp_layer_types`, `rope_parameters`, `rms_norm_eps`) from the hub keys so a written
config.json means the same thing to both readers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

FULL, SWA = 0, 1  # hybrid_layer_pattern values
DENSE, MOE = 0, 1  # moe_layer_freq values


def periodic_pattern(num_layers: int, full_every: int) -> list[int]:
    """Full attention on layer 0 and on every layer i with (i + 1) % full_every == 0; SWA elsewhere."""
    return [FULL if i == 0 or (i + 1) % full_every == 0 else SWA for i in range(num_layers)]


def first_dense_freq(num_layers: int) -> list[int]:
    """A dense MLP on layer 0, MoE on every other layer (all MiMo-V2 models)."""
    return [DENSE] + [MOE] * (num_layers - 1)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    source: str  # where the numbers come from
    hub: Mapping[str, Any]  # read-only hub config; use config() for a mutable copy
    full_every: int | None  # rule to regenerate the pattern when num_hidden_layers is overridden
    instantiable: bool  # True only for presets small enough to get random weights

    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A fresh hub config dict with `overrides` applied (hub spelling), checked for consistency.

        Overriding `num_hidden_layers` alone regenerates `hybrid_layer_pattern` (by the preset's
        rule) and `moe_layer_freq`; pass them explicitly to choose otherwise. Overriding
        `sliding_window_size` alone sets `sliding_window` too.
        """
        config = copy.deepcopy(dict(self.hub))
        overrides = dict(overrides or {})
        if "num_hidden_layers" in overrides:
            n = int(overrides["num_hidden_layers"])
            if "hybrid_layer_pattern" not in overrides:
                if self.full_every is None:
                    raise ValueError(f"{self.name}: give hybrid_layer_pattern with num_hidden_layers")
                overrides["hybrid_layer_pattern"] = periodic_pattern(n, self.full_every)
            overrides.setdefault("moe_layer_freq", first_dense_freq(n))
        if "sliding_window_size" in overrides:  # the hub carries the window under both names
            overrides.setdefault("sliding_window", overrides["sliding_window_size"])
        config.update(copy.deepcopy(overrides))
        validate(config)
        return config


def validate(config: Mapping[str, Any]) -> None:
    """Raise ValueError when per-layer lists or head counts contradict each other."""
    n = config["num_hidden_layers"]
    for key in ("hybrid_layer_pattern", "moe_layer_freq"):
        values = config[key]
        if len(values) != n or not set(values) <= {0, 1}:
            raise ValueError(f"{key} must be {n} values in {{0, 1}}, got {values}")
    for prefix in ("", "swa_"):
        heads, kv = config[f"{prefix}num_attention_heads"], config[f"{prefix}num_key_value_heads"]
        if heads % kv:
            raise ValueError(f"{prefix}num_attention_heads={heads} not a multiple of {prefix}kv heads={kv}")
    if config["sliding_window_size"] != config.get("sliding_window", config["sliding_window_size"]):
        raise ValueError("hub configs carry sliding_window == sliding_window_size (both the window W)")
    if not 0 < config["num_experts_per_tok"] <= config["n_routed_experts"]:
        raise ValueError("num_experts_per_tok must be in [1, n_routed_experts]")


def transformers_mismatches(config: Mapping[str, Any]) -> list[str]:
    """Why transformers' MiMoV2FlashForCausalLM could not load a checkpoint of this geometry ([] = it can).

    Its SWA layers always have sinks, 2 * num_key_value_heads KV heads, and the full layers' head
    dims and query heads; full layers never have sinks; q/k/v/o are separate (no fused qkv).
    """
    c = config
    checks = {
        "swa_num_key_value_heads == 2 * num_key_value_heads": c["swa_num_key_value_heads"]
        == 2 * c["num_key_value_heads"],
        "swa_num_attention_heads == num_attention_heads": c["swa_num_attention_heads"]
        == c["num_attention_heads"],
        "swa_head_dim == head_dim": c["swa_head_dim"] == c["head_dim"],
        "swa_v_head_dim == v_head_dim": c["swa_v_head_dim"] == c["v_head_dim"],
        "add_swa_attention_sink_bias": bool(c["add_swa_attention_sink_bias"]),
        "not add_full_attention_sink_bias": not c["add_full_attention_sink_bias"],
        "separate q/k/v projections": c.get("attention_projection_layout", "separate") != "fused_qkv",
        "model_type mimo_v2_flash": c["model_type"] == "mimo_v2_flash",
    }
    return [name for name, ok in checks.items() if not ok]


def transformers_mirror(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers-native keys equivalent to the hub keys it would otherwise ignore."""
    rope = {"rope_type": "default", "partial_rotary_factor": config["partial_rotary_factor"]}
    return {
        "layer_types": [
            "full_attention" if kind == FULL else "sliding_attention"
            for kind in config["hybrid_layer_pattern"]
        ],
        "mlp_layer_types": ["dense" if kind == DENSE else "sparse" for kind in config["moe_layer_freq"]],
        "rope_parameters": {
            "full_attention": {**rope, "rope_theta": float(config["rope_theta"])},
            "sliding_attention": {**rope, "rope_theta": float(config["swa_rope_theta"])},
        },
        "rms_norm_eps": config["layernorm_epsilon"],
    }


_COMMON: dict[str, Any] = {
    "architectures": ["MiMoV2FlashForCausalLM"],
    "model_type": "mimo_v2_flash",
    "vocab_size": 152_576,  # Qwen2 ids (151,643 ranks + specials) padded; same in every MiMo-V2 config
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "add_swa_attention_sink_bias": True,
    "add_full_attention_sink_bias": False,
    "hybrid_block_size": None,
    "sliding_window": 128,
    "sliding_window_size": 128,
    "attention_chunk_size": 128,
    "partial_rotary_factor": 0.334,
    "swa_rope_theta": 10_000.0,
    # No "rope_scaling": null (published configs carry it, but transformers 5.23 reads the key as
    # `rope_parameters = None` and cannot build rotary embeddings; absent means the same to the rest).
    "layernorm_epsilon": 1e-5,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": None,  # null on the hub; read as 1.0
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "n_shared_experts": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

# The test model: Flash's shape at toy size. Differing qk (48) and v (32) head dims, 16 query heads
# over 4 KV heads on full layers and 8 on SWA layers (GQA groups of 4 and 2), 5 SWA / 3 full
# layers, first layer dense, 8 experts top-2, 2 MTP layers. Rotary dim = int(48 * 0.334) = 16.
_TINY: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 48,
    "v_head_dim": 32,
    "swa_num_attention_heads": 16,
    "swa_num_key_value_heads": 8,
    "swa_head_dim": 48,
    "swa_v_head_dim": 32,
    "hybrid_layer_pattern": periodic_pattern(8, 4),  # [0, 1, 1, 0, 1, 1, 1, 0]
    "moe_layer_freq": first_dense_freq(8),
    "attention_value_scale": 0.707,
    "rope_theta": 5_000_000.0,
    "max_position_embeddings": 4096,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "num_nextn_predict_layers": 2,
    "bos_token_id": None,
    "eos_token_id": 151_645,  # <|im_end|>
    "pad_token_id": 151_643,  # <|endoftext|>
}

# XiaomiMiMo/MiMo-V2-Flash config.json, as reproduced by NVIDIA NeMo AutoModel's MiMoV2FlashConfig
# (docs.nvidia.com/nemo/automodel/.../models/mimo_v2_flash/config), Megatron-Bridge's MiMo-V2-Flash
# bridge test fixture, and the defaults of transformers 5.23 configuration_mimo_v2_flash.py:
# 48 layers, full on 0 and every 6th (0, 5, 11, ..., 47) = 9 full / 39 SWA; 64 q heads; KV heads
# 4 full / 8 SWA; head_dim 192, v 128; 256 experts top-8; window 128; thetas 5e6 / 1e4.
# MTP: the model card states 3 MTP layers; the key name is the one the V2.5/V2.6 hub configs use.
_FLASH: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 4096,
    "intermediate_size": 16_384,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 192,
    "v_head_dim": 128,
    "swa_num_attention_heads": 64,
    "swa_num_key_value_heads": 8,
    "swa_head_dim": 192,
    "swa_v_head_dim": 128,
    "hybrid_layer_pattern": periodic_pattern(48, 6),
    "moe_layer_freq": first_dense_freq(48),
    "attention_value_scale": 0.707,
    "rope_theta": 5_000_000.0,
    "max_position_embeddings": 262_144,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "num_nextn_predict_layers": 3,
}

# XiaomiMiMo/MiMo-V2.5 config.json (text backbone; vision/audio/quantization sections omitted):
# the Flash geometry with model_type "mimo_v2", fused qkv_proj, rope_theta 1e7, 1M context.
_V25: dict[str, Any] = {
    **_FLASH,
    "architectures": ["MiMoV2ForCausalLM"],
    "model_type": "mimo_v2",
    "attention_projection_layout": "fused_qkv",
    "rope_theta": 10_000_000.0,
    "max_position_embeddings": 1_048_576,
    "eos_token_id": 151_645,
    "pad_token_id": 151_643,
}

# XiaomiMiMo/MiMo-V2.5-Pro config.json: 70 layers, 10 full (0, 7, 15, 23, 31, 39, 47, 55, 62, 69)
# / 60 SWA; hidden 6144; 128 q heads; KV heads 8 on both kinds; 384 experts top-8; value scale 0.612.
_PRO_FULL_LAYERS = (0, 7, 15, 23, 31, 39, 47, 55, 62, 69)
_V25_PRO: dict[str, Any] = {
    **_V25,
    "hidden_size": 6144,
    "num_hidden_layers": 70,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "swa_num_attention_heads": 128,
    "swa_num_key_value_heads": 8,
    "hybrid_layer_pattern": [FULL if i in _PRO_FULL_LAYERS else SWA for i in range(70)],
    "moe_layer_freq": first_dense_freq(70),
    "attention_value_scale": 0.612,
    "n_routed_experts": 384,
}


def _frozen(config: dict[str, Any]) -> Mapping[str, Any]:
    validate(config)
    return MappingProxyType(copy.deepcopy(config))


PRESETS: Mapping[str, ModelPreset] = MappingProxyType(
    {
        "mimo-tiny": ModelPreset("mimo-tiny", "swaserve test model", _frozen(_TINY), 4, True),
        "mimo-v2-flash": ModelPreset(
            "mimo-v2-flash", "huggingface.co/XiaomiMiMo/MiMo-V2-Flash", _frozen(_FLASH), 6, False
        ),
        "mimo-v2.5": ModelPreset("mimo-v2.5", "huggingface.co/XiaomiMiMo/MiMo-V2.5", _frozen(_V25), 6, False),
        "mimo-v2.5-pro": ModelPreset(
            "mimo-v2.5-pro", "huggingface.co/XiaomiMiMo/MiMo-V2.5-Pro", _frozen(_V25_PRO), None, False
        ),
    }
)


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
