from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import MiMoV2FlashConfig

from services.common.kv_spec import KVLayerSpec
from services.models.config import (
    FULL,
    SWA,
    ModelConfig,
    load_config,
    window_from_config,
)

FLASH_FULL_LAYERS = [0, 5, 11, 17, 23, 29, 35, 41, 47]


def flash_hub() -> dict[str, Any]:
    """MiMo-V2-Flash as the published config.json spells it."""
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 152576,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 192,
        "v_head_dim": 128,
        "swa_num_attention_heads": 64,
        "swa_num_key_value_heads": 8,
        "swa_head_dim": 192,
        "swa_v_head_dim": 128,
        "hybrid_layer_pattern": [0 if i in FLASH_FULL_LAYERS else 1 for i in range(48)],
        "moe_layer_freq": [0] + [1] * 47,
        "rope_theta": 5_000_000,
        "swa_rope_theta": 10_000,
        "partial_rotary_factor": 0.334,
        "rope_scaling": None,
        "sliding_window": 128,
        "sliding_window_size": 128,
        "attention_chunk_size": 128,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "layernorm_epsilon": 1e-5,
        "max_position_embeddings": 262144,
        "hidden_act": "silu",
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 151645,
        "use_cache": True,
        "attention_dropout": 0.0,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }


def flash_native() -> dict[str, Any]:
    """The same model as transformers' MiMoV2FlashConfig spells it."""
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 152576,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 192,
        "v_head_dim": 128,
        "layer_types": [
            "full_attention" if i in FLASH_FULL_LAYERS else "sliding_attention" for i in range(48)
        ],
        "mlp_layer_types": ["dense"] + ["sparse"] * 47,
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "partial_rotary_factor": 0.334,
            },
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": 10_000.0,
                "partial_rotary_factor": 0.334,
            },
        },
        "sliding_window": 129,
        "attention_value_scale": 0.707,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 262144,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
    }


def test_flash_geometry_from_the_hub_config() -> None:
    c = ModelConfig.from_dict(flash_hub())
    assert [i for i, kind in enumerate(c.layer_kinds) if kind == FULL] == FLASH_FULL_LAYERS
    assert c.is_moe == (False,) + (True,) * 47
    assert c.kv_spec(0) == KVLayerSpec("full", kv_heads=4, k_dim=192, v_dim=128, window=None)
    assert c.kv_spec(1) == KVLayerSpec("swa", kv_heads=8, k_dim=192, v_dim=128, window=128)
    assert c.window == 128
    assert (c.full_attention.rope_theta, c.swa_attention and c.swa_attention.rope_theta) == (5e6, 1e4)
    assert c.full_attention.rotary_dim == 64 and c.full_attention.rotated_dims == 64
    assert not c.full_attention.has_sinks and c.swa_attention is not None and c.swa_attention.has_sinks
    assert c.attention_value_scale == 0.707 and c.rms_norm_eps == 1e-5
    assert c.moe is not None and (c.moe.num_experts, c.moe.top_k, c.moe.routed_scaling_factor) == (
        256,
        8,
        1.0,
    )
    assert c.eos_token_ids == (151645,) and c.torch_dtype == "bfloat16" and c.qkv_layout == "split"


def test_hub_and_native_spellings_give_the_same_config() -> None:
    from_transformers = MiMoV2FlashConfig(
        **{k: v for k, v in flash_native().items() if k != "dtype"}
    ).to_dict()
    from_transformers["dtype"] = "bfloat16"
    hub = ModelConfig.from_dict(flash_hub())
    assert ModelConfig.from_dict(flash_native()) == hub
    assert ModelConfig.from_dict(from_transformers) == hub


@pytest.mark.parametrize(
    ("keys", "native", "window"),
    [
        ({"sliding_window_size": 128}, False, 128),  # hub, SGLang's spelling
        ({"sliding_window": 128}, False, 128),  # hub, only the HF-style key
        ({"sliding_window": 128, "sliding_window_size": 128}, False, 128),  # the published Flash config
        ({"sliding_window": 129}, True, 128),  # transformers counts the query itself
        (
            {"sliding_window": 129, "sliding_window_size": 128},
            True,
            128,
        ),  # transformers built from the hub key
        ({"sliding_window": 129, "sliding_window_size": 128}, False, 128),  # ... with the hub keys kept
    ],
)
def test_window_rule(keys: dict[str, int], native: bool, window: int) -> None:
    assert window_from_config(keys, native=native) == window


@pytest.mark.parametrize("keys", [{"sliding_window": 200, "sliding_window_size": 128}, {}])
def test_window_rule_rejects_contradictions_and_absence(keys: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="sliding_window"):
        window_from_config(keys, native=False)


def test_native_window_129_is_128_previous_tokens() -> None:
    assert ModelConfig.from_dict(flash_native()).window == 128
    assert ModelConfig.from_dict(flash_native() | {"sliding_window": 17}).window == 16


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 64 heads cannot share 3 KV heads
        ({"hybrid_layer_pattern": [0, 1]}, "hybrid_layer_pattern"),  # wrong length
        ({"hybrid_layer_pattern": [2] * 48}, "hybrid_layer_pattern"),
        ({"moe_layer_freq": [1] * 47}, "moe_layer_freq"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),  # 256 experts do not split into 3 groups
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"head_dim": "192"}, "head_dim"),
        ({"attention_value_scale": -1.0}, "attention_value_scale"),
        ({"swa_num_key_value_heads": None}, "swa_num_key_value_heads"),
        ({"layer_types": ["full_attention"] * 48}, "layer_types"),  # contradicts hybrid_layer_pattern
        ({"attention_projection_layout": "fused_qkvz"}, "attention_projection_layout"),
        ({"partial_rotary_factor": 2.0}, "partial_rotary_factor"),
        ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ],
)
def test_invalid_values_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        ModelConfig.from_dict(flash_hub() | change)


def test_native_config_with_contradicting_swa_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="swa_num_key_value_heads"):  # transformers would use 2 x 4 = 8
        ModelConfig.from_dict(flash_native() | {"swa_num_key_value_heads": 16})


def test_unknown_harmless_keys_are_ignored() -> None:
    extra = {
        "use_cache": False,
        "initializer_range": 0.5,
        "auto_map": {"AutoConfig": "x"},
        "some_new_key": [1],
    }
    assert ModelConfig.from_dict(flash_hub() | extra) == ModelConfig.from_dict(flash_hub())


def test_pro_geometry_and_fused_qkv() -> None:
    c = ModelConfig.from_dict(
        flash_hub() | {"num_key_value_heads": 8, "attention_projection_layout": "fused_qkv"}
    )
    assert {g.kv_heads for g in c.kv_specs} == {8}
    assert c.qkv_layout == "fused_qkv" and c.fused_qkv_tp == 8


def test_moe_layer_freq_as_an_int_is_deepseek_style() -> None:
    raw = flash_hub() | {
        "moe_layer_freq": 2,
        "first_k_dense_replace": 3,
        "num_hidden_layers": 8,
        "hybrid_layer_pattern": [0, 1, 1, 1, 1, 0, 1, 1],
    }
    assert ModelConfig.from_dict(raw).is_moe == (False, False, False, False, True, False, True, False)


def test_defaults_when_patterns_are_absent_follow_transformers() -> None:
    raw = {k: v for k, v in flash_native().items() if k not in ("layer_types", "mlp_layer_types")}
    assert ModelConfig.from_dict(raw) == ModelConfig.from_dict(flash_native())


def smollm2() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "pretraining_tp": 1,
    }


def test_llama_config() -> None:
    c = ModelConfig.from_dict(smollm2())
    assert c.architecture == "llama" and set(c.layer_kinds) == {FULL} and c.window is None and c.moe is None
    assert (
        c.full_attention.head_dim == 64
        and c.full_attention.rotary_dim == 64
        and c.full_attention.num_kv_heads == 3
    )
    assert c.full_attention.rope_theta == 100000 and not c.full_attention.has_sinks
    assert c.tie_word_embeddings and not c.attention_bias and c.attention_value_scale == 1.0
    assert c.kv_specs == (KVLayerSpec("full", 3, 64, 64, None),) * 30


def test_transformers_5_llama_rope_parameters_equal_rope_theta() -> None:
    raw = {k: v for k, v in smollm2().items() if k != "rope_theta"}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    assert ModelConfig.from_dict(raw) == ModelConfig.from_dict(smollm2())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({"num_attention_heads": 7}, "head_dim"),  # 576 does not split into 7 heads
    ],
)
def test_llama_invalid_values_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        ModelConfig.from_dict(smollm2() | change)


def test_qwen2_always_has_qkv_bias() -> None:
    assert ModelConfig.from_dict(smollm2() | {"model_type": "qwen2"}).attention_bias


@pytest.mark.parametrize(("eos", "ids"), [(None, ()), (7, (7,)), ([7, 9], (7, 9))])
def test_eos_token_ids(eos: object, ids: tuple[int, ...]) -> None:
    assert ModelConfig.from_dict(smollm2() | {"eos_token_id": eos}).eos_token_ids == ids


def test_direct_construction_is_validated() -> None:
    llama = ModelConfig.from_dict(smollm2())
    with pytest.raises(ValueError, match="'sliding_window'"):
        dataclasses.replace(llama, window=128)  # no SWA layer to apply it to
    with pytest.raises(ValueError, match="'layer_kinds'"):
        dataclasses.replace(llama, layer_kinds=("full",) * 29 + ("local",))
    assert SWA not in llama.layer_kinds


def test_load_config_from_directory_file_and_dict(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(flash_hub()))
    expected = ModelConfig.from_dict(flash_hub())
    assert (
        load_config(tmp_path) == load_config(tmp_path / "config.json") == load_config(flash_hub()) == expected
    )
