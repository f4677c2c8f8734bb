"""How long the simulated workers take: prefill, KV transfer and decode of MiMo-V2-Flash on H200.

Every number of the simulation lives in this file, each with where it comes from. One simulated
worker stands for one serving instance on one node of 8 x H200, deployed as in the LMSYS post
(`--tp-size 8 --dp-size 2 --enable-dp-attention --chunked-prefill-size 16384`).

Prefill is compute-bound. A step of the real Scheduler computes positions [start, end) of some
requests; it takes

    PREFILL_STEP_OVERHEAD_S + FLOPs(step) / EFFECTIVE_FLOPS_PER_NODE

where one computed token at position p costs

    2 * active params                                          every matmul
  + full layers * 2 * (p + 1)           * heads * (d_qk + d_v)  attention over the whole prefix
  + SWA layers  * 2 * min(p + 1, W + 1) * heads * (d_qk + d_v)  attention over the window

Cached tokens are not computed (an L1 hit is on the device), but they still lengthen the
attention of the tokens after them. The KV of a finished prompt then crosses to the decode pool,
window-aware (full layers: every token, SWA layers: the last W), over one link; that time is part
of the prefill (the real prefill worker answers once the KV has landed).

Decode is memory-bound and MTP-accelerated: each output token after the first takes
DECODE_TPOT_S, flat in batch size and context (see its source below).

All methods return *simulated* seconds; `--time-scale K` divides them (`real_seconds`), so a
benchmark can shrink arrival gaps and service times alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.models.presets import FULL, get_preset

# -- calibration ---------------------------------------------------------------------------------
# Prefill. No MiMo-V2-Flash prefill throughput is published as text (the LMSYS MiMo-V2-Flash post,
# lmsys.org/blog/2025-12-16-mimo-v2-flash, shows its prefill benchmark only as a chart). The
# nearest published figure: SGLang with PD disaggregation and large-scale EP serves DeepSeek-V3
# at "52.3k input tokens per second ... per node" of 8 x H100 for 2000-token inputs
# (lmsys.org/blog/2025-05-05-large-scale-ep). ASSUMPTION: MiMo-V2-Flash on an 8 x H200 node
# reaches the same effective FLOP/s (H200 has H100's compute; prefill is compute-bound), so the
# constant below is that throughput times DeepSeek-V3's FLOPs per token at that input length.
CALIBRATION_PREFILL_TOKENS_PER_S = 52_300.0  # DeepSeek-V3, per 8 x H100 node, 2000-token inputs
CALIBRATION_PREFILL_INPUT_LEN = 2000
DEEPSEEK_V3_ACTIVE_PARAMS = 37e9  # DeepSeek-V3 model card: 671B total, 37B activated per token
DEEPSEEK_V3_LAYERS = 61  # DeepSeek-V3 config.json: num_hidden_layers
DEEPSEEK_V3_HEADS = 128  # num_attention_heads; MLA prefill runs as MHA with these dims:
DEEPSEEK_V3_QK_DIM = 192  # qk_nope_head_dim 128 + qk_rope_head_dim 64
DEEPSEEK_V3_V_DIM = 128  # v_head_dim
# ASSUMPTION: fixed cost of one prefill forward (scheduling, launches, MoE dispatch); not published.
PREFILL_STEP_OVERHEAD_S = 0.005

# Decode. LMSYS MiMo-V2-Flash post: "the per request decoding throughput remains at 150 TPS even
# under long-context settings of up to 64K input tokens with per DP rank batch size 16" (H200,
# DP 2, TP 4, MTP accept length 3.6). ASSUMPTION: flat in batch size up to the worker's
# --max-running and in context length (the post's own claim up to 64K).
DECODE_TOKENS_PER_S_PER_REQUEST = 150.0
DECODE_CALIBRATION_BATCH_PER_DP_RANK = 16

# MiMo-V2-Flash itself: 309B total, 15B active parameters (huggingface.co/XiaomiMiMo/MiMo-V2-Flash
# model card); layer kinds, heads and head dims from its config.json (services/models/presets.py).
MIMO_V2_FLASH_ACTIVE_PARAMS = 15e9
MODEL_PRESET = "mimo-v2-flash"
# KV cache dtype: the LMSYS launch command sets no --kv-cache-dtype, so SGLang keeps KV in the
# model's dtype, bfloat16.
KV_BYTES_PER_ELEMENT = 2

# KV transfer. ASSUMPTION: one 400 Gb/s RDMA NIC (ConnectX-7 line rate, 50 GB/s) per transfer,
# plus a fixed handshake of 1 ms; `--kv-link-gbps` overrides the bandwidth.
KV_LINK_GBPS = 400.0
KV_TRANSFER_LATENCY_S = 0.001


@dataclass(frozen=True)
class AttentionGeometry:
    """What the cost model needs of a hybrid SWA model: layer counts, heads, head dims, window."""

    active_params: float
    full_layers: int
    swa_layers: int
    heads: int
    swa_heads: int
    qk_dim: int
    v_dim: int
    swa_qk_dim: int
    swa_v_dim: int
    full_kv_heads: int
    swa_kv_heads: int
    window: int

    @classmethod
    def from_hub_config(cls, c: Mapping[str, Any], active_params: float) -> AttentionGeometry:
        pattern = list(c["hybrid_layer_pattern"])
        full = sum(1 for kind in pattern if kind == FULL)
        return cls(
            active_params=active_params,
            full_layers=full,
            swa_layers=len(pattern) - full,
            heads=int(c["num_attention_heads"]),
            swa_heads=int(c["swa_num_attention_heads"]),
            qk_dim=int(c["head_dim"]),
            v_dim=int(c["v_head_dim"]),
            swa_qk_dim=int(c["swa_head_dim"]),
            swa_v_dim=int(c["swa_v_head_dim"]),
            full_kv_heads=int(c["num_key_value_heads"]),
            swa_kv_heads=int(c["swa_num_key_value_heads"]),
            window=int(c["sliding_window_size"]),
        )

    def prefill_flops(self, start: int, end: int) -> float:
        """FLOPs to compute positions [start, end) with KV for [0, start) already present."""
        n = end - start
        if n <= 0:
            return 0.0
        linear = 2.0 * self.active_params * n
        # sum over p in [start, end) of (p + 1), and of min(p + 1, W + 1)
        full_ctx = (start + 1 + end) * n / 2
        full = 2.0 * self.full_layers * self.heads * (self.qk_dim + self.v_dim) * full_ctx
        swa = (
            2.0
            * self.swa_layers
            * self.swa_heads
            * (self.swa_qk_dim + self.swa_v_dim)
            * _window_ctx(start, end, self.window)
        )
        return linear + full + swa

    @property
    def full_kv_bytes_per_token(self) -> int:
        return self.full_layers * self.full_kv_heads * (self.qk_dim + self.v_dim) * KV_BYTES_PER_ELEMENT

    @property
    def swa_kv_bytes_per_token(self) -> int:
        return self.swa_layers * self.swa_kv_heads * (self.swa_qk_dim + self.swa_v_dim) * KV_BYTES_PER_ELEMENT

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of KV a prompt of num_tokens ships: full layers all tokens, SWA layers the window."""
        return self.full_kv_bytes_per_token * num_tokens + self.swa_kv_bytes_per_token * min(
            num_tokens, self.window
        )


def _window_ctx(start: int, end: int, window: int) -> float:
    """sum over p in [start, end) of min(p + 1, window + 1)."""
    cap = window + 1
    ramp_end = min(end, window)  # positions p < window see p + 1 < cap tokens
    ramp = (start + 1 + ramp_end) * (ramp_end - start) / 2 if ramp_end > start else 0.0
    return ramp + cap * max(0, end - max(start, window))


def mimo_v2_flash() -> AttentionGeometry:
    return AttentionGeometry.from_hub_config(get_preset(MODEL_PRESET).hub, MIMO_V2_FLASH_ACTIVE_PARAMS)


def deepseek_v3_flops_per_token(input_len: int) -> float:
    """DeepSeek-V3's prefill FLOPs per token averaged over a prompt of input_len (MLA as MHA)."""
    attention = 2.0 * DEEPSEEK_V3_LAYERS * DEEPSEEK_V3_HEADS * (DEEPSEEK_V3_QK_DIM + DEEPSEEK_V3_V_DIM)
    mean_ctx = (input_len + 1) / 2
    return 2.0 * DEEPSEEK_V3_ACTIVE_PARAMS + attention * mean_ctx


# The node's effective FLOP/s in prefill (see the calibration note above): about 4.1e15.
EFFECTIVE_FLOPS_PER_NODE = CALIBRATION_PREFILL_TOKENS_PER_S * deepseek_v3_flops_per_token(
    CALIBRATION_PREFILL_INPUT_LEN
)


@dataclass(frozen=True)
class CostModel:
    """Simulated seconds of prefill steps, KV transfers and decode tokens; `real_seconds` scales them."""

    geometry: AttentionGeometry = field(default_factory=mimo_v2_flash)
    effective_flops: float = EFFECTIVE_FLOPS_PER_NODE
    step_overhead_s: float = PREFILL_STEP_OVERHEAD_S
    decode_tpot_s: float = 1.0 / DECODE_TOKENS_PER_S_PER_REQUEST
    kv_link_bytes_per_s: float = KV_LINK_GBPS * 1e9 / 8
    kv_latency_s: float = KV_TRANSFER_LATENCY_S
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("effective_flops", "decode_tpot_s", "kv_link_bytes_per_s", "time_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.step_overhead_s < 0 or self.kv_latency_s < 0:
            raise ValueError("overheads must be >= 0")

    # -- simulated seconds ------------------------------------------------------------------------
    def prefill_step_seconds(self, spans: Iterable[tuple[int, int]]) -> float:
        """One forward computing each (start, end) span of positions; (0.0 for an empty step)."""
        flops = sum(self.geometry.prefill_flops(s, e) for s, e in spans)
        return self.step_overhead_s + flops / self.effective_flops if flops else 0.0

    def prefill_seconds(self, prompt_len: int, cached: int = 0, chunk: int = 16384) -> float:
        """A prompt alone on the worker: its uncached tokens in chunks of `chunk`, one step each."""
        total, start = 0.0, cached
        while start < prompt_len:
            end = min(prompt_len, start + chunk)
            total += self.prefill_step_seconds([(start, end)])
            start = end
        return total

    def kv_transfer_seconds(self, prompt_len: int) -> float:
        return self.kv_latency_s + self.geometry.kv_bytes(prompt_len) / self.kv_link_bytes_per_s

    def decode_seconds(self, num_tokens: int) -> float:
        """Time for `num_tokens` output tokens after the first."""
        return max(0, num_tokens) * self.decode_tpot_s

    def prefill_tokens_per_s(self, prompt_len: int = CALIBRATION_PREFILL_INPUT_LEN) -> float:
        """Throughput of back-to-back uncached prompts of prompt_len (simulated time)."""
        return prompt_len / self.prefill_seconds(prompt_len)

    # -- wall clock -------------------------------------------------------------------------------
    def real_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale
