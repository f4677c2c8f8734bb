from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.engine.models.causal_lm import CausalLM
from services.engine.models.loader import load_model
from services.models.config import ModelConfig
from tests.engine.model_fixtures import tiny_pro_config, write_checkpoint
from tests.engine.reference_model import init_random_

CONFIG = tiny_pro_config(attention_projection_layout="split")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    model = init_random_(CausalLM(ModelConfig.from_dict(CONFIG)), seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_loads_as(path: Path, expected: dict[str, torch.Tensor], **kwargs: object) -> CausalLM:
    model = load_model(path, **kwargs)  # type: ignore[arg-type]
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    return model


def test_round_trip_of_hub_names(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    model = assert_loads_as(write_checkpoint(tmp_path, CONFIG, reference), reference)
    assert model.config == ModelConfig.from_dict(CONFIG)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert "model.layers.1.self_attn.attention_sink_bias" in reference  # the hub name of the sinks
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in reference


def test_sharded_checkpoint_with_index(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    names = sorted(reference)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: reference[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert_loads_as(tmp_path, reference)

    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=re.escape(names[0])):
        load_model(tmp_path)


def test_native_transformers_names_are_accepted(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    native = {
        k.replace("attention_sink_bias", "sinks"): v for k, v in reference.items() if ".experts." not in k
    }
    for layer in (1, 2, 3):
        pre = f"model.layers.{layer}.mlp.experts"
        native[f"{pre}.gate_up_proj"] = torch.stack(
            [
                torch.cat([reference[f"{pre}.{e}.gate_proj.weight"], reference[f"{pre}.{e}.up_proj.weight"]])
                for e in range(8)
            ]
        )
        native[f"{pre}.down_proj"] = torch.stack([reference[f"{pre}.{e}.down_proj.weight"] for e in range(8)])
    assert_loads_as(write_checkpoint(tmp_path, CONFIG, native), reference)


def test_mtp_tensors_are_skipped_and_logged(
    tmp_path: Path, reference: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    extra = {
        "model.mtp.layers.0.enorm.weight": torch.ones(64),
        "model.mtp.layers.0.eh_proj.weight": torch.ones(64, 128),
    }
    with caplog.at_level(logging.INFO, logger="services.models.checkpoint"):
        assert_loads_as(write_checkpoint(tmp_path, CONFIG, reference | extra), reference)
    assert "skipping 2 MTP tensors" in caplog.text


def test_tied_checkpoint_may_carry_a_duplicate_lm_head(tmp_path: Path) -> None:
    config = tiny_pro_config(attention_projection_layout="split", tie_word_embeddings=True)
    state = init_random_(CausalLM(ModelConfig.from_dict(config)), seed=1).state_dict()
    assert "lm_head.weight" not in state
    model = assert_loads_as(
        write_checkpoint(tmp_path, config, state | {"lm_head.weight": torch.zeros(257, 64)}), state
    )
    torch.testing.assert_close(
        model.compute_logits(torch.eye(64)[:1]), state["model.embed_tokens.weight"][:, 0][None]
    )


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (
            lambda s: s.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
            "model.layers.2.mlp.experts.5.up_proj.weight",
        ),
        (
            lambda s: s.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(2)}),
            "model.layers.0.self_attn.rotary.inv_freq",
        ),
        (
            lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.ones(95, 64)}),
            "model.layers.1.self_attn.k_proj.weight",
        ),
        (
            lambda s: s.update({"model.layers.9.self_attn.qkv_proj.weight": torch.ones(4, 64)}),
            "model.layers.9.self_attn.qkv_proj.weight",
        ),
    ],
    ids=["missing", "unknown", "wrong-shape", "layer-out-of-range"],
)
def test_bad_checkpoints_fail_naming_the_tensor(
    tmp_path: Path, reference: dict[str, torch.Tensor], mutate: object, named: str
) -> None:
    state = dict(reference)
    mutate(state)  # type: ignore[operator]
    with pytest.raises(ValueError, match=re.escape(named)):
        load_model(write_checkpoint(tmp_path, CONFIG, state))


def test_bfloat16_load_keeps_routing_in_fp32(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    model = load_model(write_checkpoint(tmp_path, CONFIG, reference), dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.1.self_attn.q_proj.weight"] == torch.bfloat16


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (block_r x block_c) tile, edge tiles partial: fp8 values and the scale that restores them."""
    rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
    q, scale = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            tile = (slice(r * block[0], (r + 1) * block[0]), slice(c * block[1], (c + 1) * block[1]))
            scale[r, c] = w[tile].abs().max() / 448.0
            q[tile] = (w[tile] / scale[r, c]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = q.float()
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            out[r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]] *= scale[r, c]
    return out


def fuse_qkv(state: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    out = dict(state)
    for layer in range(4):
        pre = f"model.layers.{layer}.self_attn."
        q, k, v = (out.pop(pre + f"{p}_proj.weight") for p in "qkv")
        out[pre + "qkv_proj.weight"] = torch.cat(
            [torch.cat([q.chunk(tp)[t], k.chunk(tp)[t], v.chunk(tp)[t]]) for t in range(tp)]
        )
    return out


def test_block_fp8_weights_are_dequantized(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    block = (8, 16)
    config = tiny_pro_config(quantization_config={"quant_method": "fp8", "weight_block_size": list(block)})
    state, expected = fuse_qkv(reference, tp=8), dict(reference)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    state[name], state[name + "_scale_inv"] = quantize_blocks(reference[name], block)
    expected[name] = dequantize_tiles(state[name], state[name + "_scale_inv"], block)
    # layer 1's fused qkv: each of its 8 TP chunks (24 q + 12 k + 8 v rows) is quantized on its own,
    # so the scale has 8 x ceil(44 / 8) = 48 rows, not ceil(352 / 8) = 44
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    tiles = [quantize_blocks(chunk, block) for chunk in state[qkv].chunk(8)]
    state[qkv], state[qkv + "_scale_inv"] = torch.cat([q for q, _ in tiles]), torch.cat([s for _, s in tiles])
    restored = torch.stack([dequantize_tiles(q, s, block) for q, s in tiles])  # [tp, 44, hidden]
    for proj, rows in (("q_proj", slice(0, 24)), ("k_proj", slice(24, 36)), ("v_proj", slice(36, 44))):
        expected[f"model.layers.1.self_attn.{proj}.weight"] = restored[:, rows].reshape(-1, 64)

    loaded = load_model(write_checkpoint(tmp_path, config, state)).state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor, msg=key)
    torch.testing.assert_close(
        loaded[name], reference[name], rtol=0.07, atol=1e-3
    )  # fp8 is coarse, not wrong
    torch.testing.assert_close(
        loaded["model.layers.1.self_attn.k_proj.weight"],
        reference["model.layers.1.self_attn.k_proj.weight"],
        rtol=0.07,
        atol=1e-3,
    )


def test_fp8_weight_without_scale_is_rejected(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    state = reference | {
        "model.layers.0.mlp.up_proj.weight": reference["model.layers.0.mlp.up_proj.weight"].to(
            torch.float8_e4m3fn
        )
    }
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        load_model(write_checkpoint(tmp_path, CONFIG, state))
