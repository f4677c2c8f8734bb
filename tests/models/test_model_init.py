"""Random MiMo checkpoints load into transformers' MiMoV2FlashForCausalLM; presets hold the real geometries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from services.models.model_init import checkpoint_tensors, init_model
from services.models.presets import (
    PRESETS,
    get_preset,
    periodic_pattern,
    transformers_mirror,
    transformers_mismatches,
)

# A fast variant for the byte-level tests: small vocabulary (hence own eos/pad and no tokenizer).
SMALL = {
    "vocab_size": 512,
    "num_hidden_layers": 4,
    "max_position_embeddings": 512,
    "eos_token_id": 511,
    "pad_token_id": 510,
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("mimo-tiny"), preset="mimo-tiny", seed=0)


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir: Path) -> tuple[Any, dict[str, Any]]:
    from transformers import MiMoV2FlashForCausalLM

    loaded: Any = MiMoV2FlashForCausalLM.from_pretrained(
        tiny_dir, output_loading_info=True, dtype=torch.float32
    )
    return loaded  # (model, loading info)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*.safetensors")))).hexdigest()


def test_transformers_loads_tiny_with_no_missing_or_unexpected_keys(
    hf_tiny: tuple[Any, dict[str, Any]],
) -> None:
    model, info = hf_tiny
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.sliding_window == 129  # hub sliding_window_size 128 -> query + 128 previous
    kinds = {0: "full_attention", 1: "sliding_attention"}
    assert config.layer_types == [kinds[k] for k in (0, 1, 1, 0, 1, 1, 1, 0)]
    assert config.mlp_layer_types == ["dense"] + ["sparse"] * 7
    assert config.rope_parameters["full_attention"]["rope_theta"] == 5_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    swa, full = model.model.layers[1].self_attn, model.model.layers[0].self_attn
    assert swa.k_proj.out_features == 8 * 48 and full.k_proj.out_features == 4 * 48
    assert swa.v_proj.out_features == 8 * 32 and swa.o_proj.in_features == 16 * 32
    assert full.sinks is None and swa.sinks is not None


def test_transformers_forward_runs(hf_tiny: tuple[Any, dict[str, Any]]) -> None:
    model, _ = hf_tiny
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 0, 151645, 198]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 8, 152_576) and torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.05  # random weights, not a degenerate zero model


def test_loaded_values_are_the_file_values(tiny_dir: Path, hf_tiny: tuple[Any, dict[str, Any]]) -> None:
    model, _ = hf_tiny
    stored = _tensors(tiny_dir)
    layer = model.model.layers[2]
    assert torch.equal(layer.self_attn.sinks, stored["model.layers.2.self_attn.attention_sink_bias"].float())
    bias = stored["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    assert torch.equal(layer.mlp.gate.e_score_correction_bias, bias)
    gate_up = torch.cat([stored[f"model.layers.2.mlp.experts.5.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(layer.mlp.experts.gate_up_proj[5], gate_up.float())
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())


def test_tensor_names_follow_the_published_layout(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    stored = _tensors(tiny_dir)
    assert set(stored) == {spec.name for spec in checkpoint_tensors(config)}
    for i, kind in enumerate(config["hybrid_layer_pattern"]):
        assert (f"model.layers.{i}.self_attn.attention_sink_bias" in stored) == (kind == 1)
    assert "model.layers.0.mlp.gate_proj.weight" in stored and "model.layers.0.mlp.gate.weight" not in stored
    assert stored["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (256, 128)
    mtp = {
        name.removeprefix("model.mtp.layers.1.") for name in stored if name.startswith("model.mtp.layers.1.")
    }
    assert mtp == {
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "input_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.attention_sink_bias", "pre_mlp_layernorm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "final_layernorm.weight",
    }  # fmt: skip
    assert stored["model.mtp.layers.1.eh_proj.weight"].shape == (256, 512)
    assert not any(name.startswith("model.mtp.layers.2.") for name in stored)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    norm = stored["model.norm.weight"].float()
    assert (norm - 1).abs().max() < 0.5 and norm.std() > 0.01


def test_written_config_has_hub_keys_and_the_transformers_mirror(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    hub = get_preset("mimo-tiny").config()
    assert {k: config[k] for k in hub} == hub
    assert config["sliding_window_size"] == 128 and config["sliding_window"] == 128
    assert {k: config[k] for k in transformers_mirror(hub)} == transformers_mirror(hub)
    assert "rope_scaling" not in config  # a null rope_scaling wipes transformers' rope_parameters
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert (tiny_dir / "tokenizer.json").is_file() and (tiny_dir / "tokenizer_config.json").is_file()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = init_model(tmp_path / "a", seed=7, overrides=SMALL)
    b = init_model(tmp_path / "b", seed=7, overrides=SMALL)
    c = init_model(tmp_path / "c", seed=8, overrides=SMALL)
    assert _digest(a) == _digest(b) != _digest(c)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert not (a / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="eos_token_id=151645 outside vocab_size=512"):
        init_model(tmp_path / "d", overrides={"vocab_size": 512})


def test_sharded_checkpoint_has_a_complete_index_and_loads(tmp_path: Path) -> None:
    from transformers import MiMoV2FlashForCausalLM

    out = init_model(tmp_path / "sharded", overrides=SMALL, max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(_tensors(out))
    loaded: Any = MiMoV2FlashForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    info = loaded[1]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_flash_preset_is_the_published_geometry() -> None:
    flash = get_preset("mimo-v2-flash").config()
    pattern = flash["hybrid_layer_pattern"]
    assert (pattern.count(1), pattern.count(0)) == (39, 9)
    assert [i for i, kind in enumerate(pattern) if kind == 0] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert (flash["num_key_value_heads"], flash["swa_num_key_value_heads"]) == (4, 8)
    assert (flash["head_dim"], flash["v_head_dim"], flash["num_attention_heads"]) == (192, 128, 64)
    assert (flash["n_routed_experts"], flash["num_experts_per_tok"], flash["sliding_window_size"]) == (
        256,
        8,
        128,
    )
    assert transformers_mismatches(flash) == []


def test_v25_presets() -> None:
    pro = get_preset("mimo-v2.5-pro").config()
    assert pro["hybrid_layer_pattern"].count(1) == 60 and pro["hybrid_layer_pattern"].count(0) == 10
    assert (pro["num_key_value_heads"], pro["swa_num_key_value_heads"], pro["hidden_size"]) == (8, 8, 6144)
    assert pro["attention_projection_layout"] == "fused_qkv"
    assert "swa_num_key_value_heads == 2 * num_key_value_heads" in transformers_mismatches(pro)
    v25 = get_preset("mimo-v2.5").config()
    assert v25["hybrid_layer_pattern"] == get_preset("mimo-v2-flash").config()["hybrid_layer_pattern"]
    assert v25["max_position_embeddings"] == 1_048_576


def test_transformers_reads_the_flash_geometry(tmp_path: Path) -> None:
    from transformers import AutoConfig

    hub = get_preset("mimo-v2-flash").config()
    (tmp_path / "config.json").write_text(json.dumps({**hub, **transformers_mirror(hub)}))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.sliding_window == 129 and config.num_key_value_heads == 4
    assert config.layer_types == transformers_mirror(hub)["layer_types"]


def test_preset_overrides_and_validation() -> None:
    tiny = get_preset("mimo-tiny")
    four = tiny.config({"num_hidden_layers": 4})
    assert four["hybrid_layer_pattern"] == [0, 1, 1, 0] and four["moe_layer_freq"] == [0, 1, 1, 1]
    assert tiny.config({"sliding_window_size": 16})["sliding_window"] == 16
    assert tiny.hub["hidden_size"] == 256  # overrides never leak into the preset
    assert periodic_pattern(12, 6) == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="hybrid_layer_pattern"):
        tiny.config({"hybrid_layer_pattern": [0, 1]})
    with pytest.raises(ValueError, match="give hybrid_layer_pattern"):
        get_preset("mimo-v2.5-pro").config({"num_hidden_layers": 4})
    with pytest.raises(ValueError, match="geometry only"):
        init_model("/nonexistent", preset="mimo-v2-flash")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("mimo-v3")
    assert set(PRESETS) == {"mimo-tiny", "mimo-v2-flash", "mimo-v2.5", "mimo-v2.5-pro"}
