"""MiMo-V2.5-Pro geometry (8 KV heads on full and SWA layers, fused TP-interleaved qkv_proj, sinks on
both kinds) against a plain full-sequence forward written out here from the same weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from services.engine.models.loader import load_model
from services.models.checkpoint import split_fused_qkv
from services.models.config import AttentionSpec, load_config
from tests.engine.model_fixtures import (
    prompt_logits,
    random_prompt,
    relative_error,
    tiny_pro_config,
    write_checkpoint,
)
from tests.engine.reference_model import greedy_generate

Weights = dict[str, torch.Tensor]


def geometry(cfg: dict[str, Any], layer: int) -> tuple[int, int, int, int, float]:
    p = "swa_" if cfg["hybrid_layer_pattern"][layer] == 1 else ""
    theta = cfg["swa_rope_theta"] if p else cfg["rope_theta"]
    return (
        cfg[f"{p}num_attention_heads"],
        cfg[f"{p}num_key_value_heads"],
        cfg[f"{p}head_dim"],
        cfg[f"{p}v_head_dim"],
        theta,
    )


def random_weights(cfg: dict[str, Any], seed: int = 0) -> Weights:
    """Hub-named weights with separate q/k/v projections."""
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return std * torch.randn(shape, generator=gen)

    w: Weights = {
        "model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": 1 + rnd(hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        heads, kv, hd, vd, _ = geometry(cfg, i)
        w |= {
            pre + "input_layernorm.weight": 1 + rnd(hidden),
            pre + "post_attention_layernorm.weight": 1 + rnd(hidden),
            pre + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
            pre + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
            pre + "self_attn.v_proj.weight": rnd(kv * vd, hidden),
            pre + "self_attn.o_proj.weight": rnd(hidden, heads * vd),
            pre + "self_attn.attention_sink_bias": rnd(heads, std=1.0),
        }
        if cfg["moe_layer_freq"][i]:
            e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            w |= {
                pre + "mlp.gate.weight": rnd(e, hidden),
                pre + "mlp.gate.e_score_correction_bias": rnd(e, std=0.3),
            }
            for j in range(e):
                w |= {
                    f"{pre}mlp.experts.{j}.gate_proj.weight": rnd(inter, hidden),
                    f"{pre}mlp.experts.{j}.up_proj.weight": rnd(inter, hidden),
                    f"{pre}mlp.experts.{j}.down_proj.weight": rnd(hidden, inter),
                }
        else:
            inter = cfg["intermediate_size"]
            w |= {
                pre + "mlp.gate_proj.weight": rnd(inter, hidden),
                pre + "mlp.up_proj.weight": rnd(inter, hidden),
                pre + "mlp.down_proj.weight": rnd(hidden, inter),
            }
    return w


def fuse(w: Weights, cfg: dict[str, Any], interleave: bool = True) -> Weights:
    """Separate q/k/v -> one qkv_proj: per TP rank t, [q_t; k_t; v_t] (or plain [q; k; v])."""
    tp, out = cfg["num_key_value_heads"], dict(w)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}.self_attn."
        q, k, v = (out.pop(pre + f"{p}_proj.weight") for p in "qkv")
        parts = (
            [torch.cat([q.chunk(tp)[t], k.chunk(tp)[t], v.chunk(tp)[t]]) for t in range(tp)]
            if interleave
            else [q, k, v]
        )
        out[pre + "qkv_proj.weight"] = torch.cat(parts)
    return out


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x: torch.Tensor, theta: float, rotary: int) -> torch.Tensor:
    """x [T, H, D]; pairs (j, j + rotary/2) of the first `rotary` dims turn by pos * theta^(-2j/rotary)."""
    half = rotary // 2
    pos = torch.arange(x.shape[0], dtype=torch.float32)[:, None, None]
    angle = pos * torch.tensor([theta ** (-2 * j / rotary) for j in range(half)])
    a, b = x[..., :half], x[..., half:rotary]
    return torch.cat(
        [a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin(), x[..., rotary:]], -1
    )


def swiglu(x: torch.Tensor, w: Weights, pre: str) -> torch.Tensor:
    gate, up = x @ w[pre + "gate_proj.weight"].T, x @ w[pre + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ w[pre + "down_proj.weight"].T


def plain_forward(cfg: dict[str, Any], w: Weights, ids: list[int]) -> torch.Tensor:
    eps, n = cfg["layernorm_epsilon"], len(ids)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        heads, kv, hd, vd, theta = geometry(cfg, i)
        h = rms(x, w[pre + "input_layernorm.weight"], eps)
        q = rope(
            (h @ w[pre + "self_attn.q_proj.weight"].T).view(n, heads, hd),
            theta,
            int(hd * cfg["partial_rotary_factor"]),
        )
        k = rope(
            (h @ w[pre + "self_attn.k_proj.weight"].T).view(n, kv, hd),
            theta,
            int(hd * cfg["partial_rotary_factor"]),
        )
        v = (h @ w[pre + "self_attn.v_proj.weight"].T).view(n, kv, vd) * cfg["attention_value_scale"]
        out = torch.zeros(n, heads, vd)
        for head in range(heads):
            kvh = head // (heads // kv)
            for t in range(n):
                first = max(0, t - cfg["sliding_window_size"]) if cfg["hybrid_layer_pattern"][i] else 0
                logits = (k[first : t + 1, kvh] @ q[t, head]) / math.sqrt(hd)
                probs = torch.softmax(
                    torch.cat([logits, w[pre + "self_attn.attention_sink_bias"][head : head + 1]]), 0
                )
                out[t, head] = probs[:-1] @ v[first : t + 1, kvh]
        x = x + out.reshape(n, heads * vd) @ w[pre + "self_attn.o_proj.weight"].T
        h = rms(x, w[pre + "post_attention_layernorm.weight"], eps)
        if cfg["moe_layer_freq"][i]:
            scores = torch.sigmoid(h @ w[pre + "mlp.gate.weight"].T)
            mlp = torch.zeros_like(h)
            for t in range(n):
                chosen = (scores[t] + w[pre + "mlp.gate.e_score_correction_bias"]).argsort(descending=True)[
                    :2
                ]
                for e in chosen.tolist():
                    mlp[t] += (
                        scores[t, e] / scores[t, chosen].sum() * swiglu(h[t], w, f"{pre}mlp.experts.{e}.")
                    )
        else:
            mlp = swiglu(h, w, pre + "mlp.")
        x = x + mlp
    return rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def pro(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Weights, Path]:
    cfg = tiny_pro_config()
    w = random_weights(cfg)
    return cfg, w, write_checkpoint(tmp_path_factory.mktemp("pro"), cfg, fuse(w, cfg))


def test_pro_geometry_is_8_kv_heads_everywhere(pro: tuple[dict[str, Any], Weights, Path]) -> None:
    config = load_config(pro[2])
    assert config.qkv_layout == "fused_qkv" and config.fused_qkv_tp == 8
    assert [(g.kv_heads, g.window) for g in config.kv_specs] == [(8, None), (8, 6), (8, 6), (8, None)]


def test_fused_pro_checkpoint_matches_plain_forward(pro: tuple[dict[str, Any], Weights, Path]) -> None:
    cfg, w, path = pro
    model = load_model(path)
    prompt = random_prompt(20, cfg["vocab_size"], seed=1)  # more than three windows
    assert relative_error(prompt_logits(model, prompt), plain_forward(cfg, w, prompt)) < 1e-4

    generated = greedy_generate(model, [prompt], 6)[0]  # the decode path, checked by teacher forcing
    plain = plain_forward(cfg, w, prompt + generated[:-1])
    assert plain[len(prompt) - 1 :].argmax(-1).tolist() == generated


def test_plain_concatenated_qkv_is_not_the_fused_layout(
    pro: tuple[dict[str, Any], Weights, Path], tmp_path: Path
) -> None:
    cfg, w, _ = pro
    plain_cat = write_checkpoint(tmp_path, cfg, fuse(w, cfg, interleave=False))  # same shape, wrong layout
    prompt = random_prompt(12, cfg["vocab_size"], seed=2)
    assert relative_error(prompt_logits(load_model(plain_cat), prompt), plain_forward(cfg, w, prompt)) > 1e-2


@pytest.mark.parametrize("kv_heads", [8, 2])  # 2 < tp: each KV head replicated on tp / 2 ranks
def test_split_fused_qkv_undoes_the_tp_interleave(kv_heads: int) -> None:
    tp, heads, hd, vd, hidden = 4, 8, 6, 4, 5
    spec = AttentionSpec(heads, kv_heads, hd, vd, 10_000.0, 2, False)
    q, k, v = (
        torch.randn(heads * hd, hidden),
        torch.randn(kv_heads * hd, hidden),
        torch.randn(kv_heads * vd, hidden),
    )
    per_rank = max(1, kv_heads // tp)
    owner = [t * kv_heads // tp for t in range(tp)]  # the KV head block rank t holds

    def rank_rows(x: torch.Tensor, d: int, t: int) -> torch.Tensor:
        return x.view(kv_heads, d, hidden)[owner[t] : owner[t] + per_rank].reshape(-1, hidden)

    fused = torch.cat(
        [torch.cat([q.chunk(tp)[t], rank_rows(k, hd, t), rank_rows(v, vd, t)]) for t in range(tp)]
    )
    for got, want in zip(split_fused_qkv(fused, spec, tp), (q, k, v), strict=True):
        assert torch.equal(got, want)
    bias = fused[:, 0].clone()  # a bias splits like a one-column weight
    assert torch.equal(split_fused_qkv(bias, spec, tp)[1], k[:, 0])


def test_fused_qkv_with_wrong_row_count_names_the_tensor() -> None:
    spec = AttentionSpec(8, 8, 6, 4, 10_000.0, 2, False)
    with pytest.raises(ValueError, match="model.layers.3.self_attn.qkv_proj.weight"):
        split_fused_qkv(torch.randn(100, 5), spec, 4, "model.layers.3.self_attn.qkv_proj.weight")
