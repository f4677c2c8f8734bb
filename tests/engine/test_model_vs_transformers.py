"""Parity with transformers' own implementations (eager, fp32) on tiny random checkpoints.

Each checkpoint is written by transformers' `save_pretrained` and read back by our `load_model`, so
these tests also cover the config spelling and tensor names transformers writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MiMoV2FlashConfig,
    MiMoV2FlashForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from services.engine.models.causal_lm import CausalLM
from services.engine.models.loader import load_model
from services.engine.models.moe import MoE
from tests.engine.model_fixtures import SEED, prompt_logits, random_prompt, randomize_, relative_error
from tests.engine.reference_model import greedy_generate

TOLERANCE = 1e-4
NEW_TOKENS = 32
VOCAB = 300


def save_random(model: PreTrainedModel, path: Path) -> Path:
    randomize_(model, SEED, std=0.1)
    model.eval().save_pretrained(path)
    return path


def hf_mimo(tmp_path: Path, window: int, **overrides: Any) -> tuple[MiMoV2FlashForCausalLM, CausalLM]:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        v_head_dim=16,
        layer_types=[
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"],
        n_routed_experts=8,
        num_experts_per_tok=2,
        sliding_window_size=window,
        attention_value_scale=0.6,
        max_position_embeddings=1024,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    ref = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**kwargs))
    ref.config._attn_implementation = "eager"
    path = save_random(ref, tmp_path / "mimo")
    return ref, load_model(path)


@torch.no_grad()
def hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt]), use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Prefill, then one token at a time through transformers' own KV cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    while True:
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) == new_tokens:
            return tokens
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)


MIMO_CASES = [  # (window, prompt length, config overrides)
    (8, 5, {}),  # prompt shorter than the window
    (8, 40, {}),  # five windows long
    (16, 70, {"n_group": 4, "topk_group": 2}),  # group-limited routing too
    (128, 300, {}),  # MiMo's real window, a prompt more than twice as long
]


@pytest.mark.parametrize(("window", "length", "overrides"), MIMO_CASES)
def test_mimo_prompt_logits_and_greedy_match_transformers(
    tmp_path: Path, window: int, length: int, overrides: dict[str, Any]
) -> None:
    ref, ours = hf_mimo(tmp_path, window, **overrides)
    assert ours.config.window == window
    prompt = random_prompt(length, VOCAB, seed=window + length)

    assert relative_error(prompt_logits(ours, prompt), hf_logits(ref, prompt)) < TOLERANCE
    assert greedy_generate(ours, [prompt], NEW_TOKENS) == [hf_greedy(ref, prompt, NEW_TOKENS)]


def test_random_mimo_weights_exercise_sinks_bias_and_value_scale(tmp_path: Path) -> None:
    _, ours = hf_mimo(tmp_path, 8)
    swa = ours.model.layer(1)
    assert swa.self_attn.attention_sink_bias is not None and swa.self_attn.attention_sink_bias.abs().min() > 0
    assert ours.model.layer(0).self_attn.attention_sink_bias is None  # full layers: no sinks
    assert isinstance(swa.mlp, MoE) and swa.mlp.gate.e_score_correction_bias.abs().min() > 0
    assert ours.config.attention_value_scale == 0.6


@pytest.mark.parametrize("shift", [-1, 1])
def test_off_by_one_window_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int) -> None:
    """Seeing 127 or 129 previous tokens instead of 128 (here 7 / 9 instead of 8) breaks parity."""
    window = 8
    ref, ours = hf_mimo(tmp_path, window)
    prompt = random_prompt(40, VOCAB, seed=7)
    expected = hf_logits(ref, prompt)
    assert relative_error(prompt_logits(ours, prompt), expected) < TOLERANCE
    for layer_id in range(ours.config.num_layers):
        if (attn := ours.model.layer(layer_id).self_attn).window is not None:
            monkeypatch.setattr(attn, "window", window + shift)
    assert relative_error(prompt_logits(ours, prompt), expected) > 100 * TOLERANCE


def test_packed_generation_equals_one_prompt_at_a_time(tmp_path: Path) -> None:
    _, ours = hf_mimo(tmp_path, 8)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (3, 19, 11)]
    packed = greedy_generate(ours, prompts, 12)
    assert packed == [greedy_generate(ours, [p], 12)[0] for p in prompts]
    assert len({tuple(p) for p in packed}) == 3  # distinct continuations: nothing leaked across sequences


def test_generation_stops_at_a_stop_token(tmp_path: Path) -> None:
    _, ours = hf_mimo(tmp_path, 8)
    prompt = random_prompt(10, VOCAB, seed=3)
    free = greedy_generate(ours, [prompt], 8)[0]
    assert greedy_generate(ours, [prompt], 8, stop_ids=(free[2],))[0] == free[: free.index(free[2]) + 1]


@pytest.mark.parametrize("tied", [True, False])
def test_llama_matches_transformers(tmp_path: Path, tied: bool) -> None:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    ref = LlamaForCausalLM(config)
    ref.config._attn_implementation = "eager"
    ours = load_model(save_random(ref, tmp_path / "llama"))
    assert (ours.lm_head is None) == tied
    prompt = random_prompt(50, VOCAB, seed=5)
    assert relative_error(prompt_logits(ours, prompt), hf_logits(ref, prompt)) < TOLERANCE
    assert greedy_generate(ours, [prompt], NEW_TOKENS) == [hf_greedy(ref, prompt, NEW_TOKENS)]


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path: Path) -> None:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    ref = Qwen2ForCausalLM(config)
    ref.config._attn_implementation = "eager"
    ours = load_model(save_random(ref, tmp_path / "qwen2"))
    assert ours.model.layer(0).self_attn.q_proj.bias is not None
    prompt = random_prompt(30, VOCAB, seed=6)
    assert relative_error(prompt_logits(ours, prompt), hf_logits(ref, prompt)) < TOLERANCE
    assert greedy_generate(ours, [prompt], NEW_TOKENS) == [hf_greedy(ref, prompt, NEW_TOKENS)]
