"""Model configuration: one frozen `ModelConfig`, parsed once from a Hugging Face config.json.

Two architectures:
  * `mimo_v2_flash` — MiMo-V2-Flash / V2.5 / V2.5-Pro: hybrid full / sliding-window attention with
    per-kind geometry, attention sinks, partial rotary, MoE with sigmoid routing.
  * `llama` — Llama / SmolLM2 / Qwen2-style: every layer full attention, dense SwiGLU MLP.

MiMo configs come in two spellings, both read here: the hub spelling of the published checkpoints (`hybrid_layer_pattern`,
`moe_layer_freq`, `swa_*`, `sliding_window_size`, `layernorm_epsilon`) and the native spelling that
transformers' `MiMoV2FlashConfig` writes (`layer_types`, `mlp_layer_types`, per-kind
`rope_parameters`, `rms_norm_eps`, `sliding_window = window + 1`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.kv_spec import KVLayerSpec, kv_kind

FULL = "full"
SWA = "swa"
LAYER_KINDS = (FULL, SWA)


@dataclass(frozen=True)
class AttentionSpec:
    """Geometry of one layer kind's attention (all full layers share one, all SWA layers another)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # q and k
    v_head_dim: int
    rope_theta: float
    # int(head_dim * partial_rotary_factor): frequencies are theta^(-i / rotary_dim) for even i <
    # rotary_dim, so the leading 2 * ceil(rotary_dim / 2) dims of each q/k head rotate (one more than
    # rotary_dim when it is odd, as in transformers); the rest pass through.
    rotary_dim: int
    has_sinks: bool

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim"):
            _require(getattr(self, name) > 0, name, getattr(self, name))
        _require(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads", self.num_kv_heads)
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta)
        ok_rotary = 0 <= self.rotated_dims <= self.head_dim
        _require(ok_rotary, "partial_rotary_factor", f"rotary_dim={self.rotary_dim}")

    @property
    def rotated_dims(self) -> int:
        return 2 * ((self.rotary_dim + 1) // 2)

    @property
    def scale(self) -> float:
        return float(self.head_dim) ** -0.5


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # per routed expert
    num_shared_experts: int = 0  # shared SwiGLU of width intermediate_size * num_shared_experts
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"

    def __post_init__(self) -> None:
        _require(self.num_experts > 0, "n_routed_experts", self.num_experts)
        _require(0 < self.top_k <= self.num_experts, "num_experts_per_tok", self.top_k)
        _require(self.intermediate_size > 0, "moe_intermediate_size", self.intermediate_size)
        _require(self.num_shared_experts >= 0, "n_shared_experts", self.num_shared_experts)
        _require(self.n_group > 0 and self.num_experts % self.n_group == 0, "n_group", self.n_group)
        # Group scores are the sum of each group's top-2 experts, so a group needs two of them.
        _require(self.n_group == 1 or self.num_experts // self.n_group >= 2, "n_group", self.n_group)
        _require(0 < self.topk_group <= self.n_group, "topk_group", self.topk_group)
        groups_hold_top_k = self.topk_group * (self.num_experts // self.n_group) >= self.top_k
        _require(groups_hold_top_k, "topk_group", self.topk_group)
        _require(self.scoring_func == "sigmoid", "scoring_func", self.scoring_func)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "mimo_v2_flash" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    layer_kinds: tuple[str, ...]  # FULL or SWA, one per decoder layer
    is_moe: tuple[bool, ...]  # one per decoder layer
    full_attention: AttentionSpec
    swa_attention: AttentionSpec | None  # None iff no layer is SWA
    window: int | None  # previous tokens an SWA query sees besides itself (MiMo: 128); None iff no SWA
    rms_norm_eps: float
    max_position_embeddings: int
    moe: MoESpec | None = None  # None iff no layer is MoE
    attention_value_scale: float = 1.0  # v is multiplied by this before it is cached
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qkv_layout: str = "split"  # checkpoint layout of q/k/v: "split" or "fused_qkv"
    fused_qkv_tp: int = 1  # TP chunks interleaved in a fused qkv_proj (see checkpoint.split_fused_qkv)
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # the checkpoint's dtype, informational

    def __post_init__(self) -> None:
        _require(self.architecture in ("mimo_v2_flash", "llama"), "architecture", self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings"):
            _require(getattr(self, name) > 0, name, getattr(self, name))
        _require(len(self.layer_kinds) > 0, "num_hidden_layers", 0)
        _require(all(k in LAYER_KINDS for k in self.layer_kinds), "layer_kinds", self.layer_kinds)
        _require(len(self.is_moe) == self.num_layers, "is_moe", f"{len(self.is_moe)} entries")
        has_swa = SWA in self.layer_kinds
        _require((self.swa_attention is not None) == has_swa, "swa_attention", self.swa_attention)
        _require((self.window is not None) == has_swa, "sliding_window", self.window)
        _require(self.window is None or self.window > 0, "sliding_window", self.window)
        _require((self.moe is not None) == any(self.is_moe), "moe", self.moe)
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps)
        _require(self.attention_value_scale > 0, "attention_value_scale", self.attention_value_scale)
        _require(self.qkv_layout in ("split", "fused_qkv"), "attention_projection_layout", self.qkv_layout)
        _require(self.fused_qkv_tp > 0, "fused_qkv_tp", self.fused_qkv_tp)
        if self.qkv_layout == "fused_qkv":
            for spec in self.attention_specs:
                _require(spec.num_heads % self.fused_qkv_tp == 0, "fused_qkv_tp", self.fused_qkv_tp)
                kv_splits = spec.num_kv_heads % self.fused_qkv_tp == 0
                kv_replicated = self.fused_qkv_tp % spec.num_kv_heads == 0
                _require(kv_splits or kv_replicated, "fused_qkv_tp", self.fused_qkv_tp)

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def attention_specs(self) -> tuple[AttentionSpec, ...]:
        return (
            (self.full_attention,)
            if self.swa_attention is None
            else (self.full_attention, self.swa_attention)
        )

    def attention(self, layer_id: int) -> AttentionSpec:
        if self.layer_kinds[layer_id] == SWA:
            assert self.swa_attention is not None
            return self.swa_attention
        return self.full_attention

    def layer_window(self, layer_id: int) -> int | None:
        return self.window if self.layer_kinds[layer_id] == SWA else None

    def kv_spec(self, layer_id: int) -> KVLayerSpec:
        """What a KV pool, a payload and an L3 key need to know about the layer's KV."""
        spec = self.attention(layer_id)
        kind = kv_kind(self.layer_kinds[layer_id])
        return KVLayerSpec(kind, spec.num_kv_heads, spec.head_dim, spec.v_head_dim, self.layer_window(layer_id))

    @property
    def kv_specs(self) -> tuple[KVLayerSpec, ...]:
        return tuple(self.kv_spec(i) for i in range(self.num_layers))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (either MiMo spelling, or a Llama/Qwen2 config)."""
        return _parse_mimo(raw) if architecture_of(raw) == "mimo_v2_flash" else _parse_llama(raw)


def load_config(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> ModelConfig:
    """A model directory, a config.json path, or an already-parsed dict -> ModelConfig."""
    if isinstance(path_or_dict, Mapping):
        return ModelConfig.from_dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f))


def _require(ok: bool, field: str, value: object) -> None:
    if not ok:
        raise ValueError(f"invalid model config field {field!r}: {value!r}")


# ---- parsing Hugging Face config dicts ----------------------------------------------------------

_MIMO_MODEL_TYPES = ("mimo_v2_flash", "mimo_v2")
_MIMO_ARCHITECTURES = ("MiMoV2FlashForCausalLM", "MiMoV2ForCausalLM")
_LLAMA_MODEL_TYPES = ("llama", "qwen2")
_HF_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SWA}
_HF_KIND_NAMES = {FULL: "full_attention", SWA: "sliding_attention"}
_MISSING: Any = object()


def architecture_of(raw: Mapping[str, Any]) -> str:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in _MIMO_MODEL_TYPES or any(a in _MIMO_ARCHITECTURES for a in architectures):
        return "mimo_v2_flash"
    if model_type in _LLAMA_MODEL_TYPES:
        return "llama"
    raise ValueError(
        f"invalid model config field 'model_type': {model_type!r} (supported: "
        f"{', '.join(_MIMO_MODEL_TYPES + _LLAMA_MODEL_TYPES)})"
    )


def is_native_mimo_spelling(raw: Mapping[str, Any]) -> bool:
    """True for a config in transformers' MiMoV2FlashConfig spelling rather than the published hub one.

    Hub configs always carry `hybrid_layer_pattern` (SGLang's loader requires it); transformers never
    reads or writes it (it writes `layer_types`), unless it re-saves a hub config, which then keeps
    the hub keys and is read as hub spelling.
    """
    return "hybrid_layer_pattern" not in raw


def window_from_config(raw: Mapping[str, Any], *, native: bool) -> int:
    """Previous tokens an SWA query sees besides itself (MiMo: 128), from either config spelling.

    The SGLang reference attends to the query plus `sliding_window_size` previous tokens. Hub configs
    say `sliding_window_size: 128` (and usually `sliding_window: 128` too); transformers' native
    config stores `sliding_window = sliding_window_size + 1` (129) and keeps `sliding_window_size`
    when it was given. So: `sliding_window_size` wins; else a native `sliding_window` counts the
    query itself and a hub `sliding_window` does not.
    """
    size = _opt_int(raw, "sliding_window_size")
    window = _opt_int(raw, "sliding_window")
    if size is not None:
        # hub: both say 128; transformers: 129 next to the 128 it was built from
        _require(window is None or window in (size, size + 1), "sliding_window", window)
        return size
    _require(window is not None, "sliding_window_size", None)
    assert window is not None
    return window - 1 if native else window


def _parse_mimo(raw: Mapping[str, Any]) -> ModelConfig:
    native = is_native_mimo_spelling(raw)
    n = _int(raw, "num_hidden_layers")
    kinds, is_moe = _mimo_layer_kinds(raw, n), _mimo_moe_layers(raw, n)
    full = _mimo_attention(raw, FULL, native)
    value_scale = raw.get("attention_value_scale", 0.707 if native else None)  # transformers' default
    eps_keys = ("rms_norm_eps", "layernorm_epsilon") if native else ("layernorm_epsilon", "rms_norm_eps")
    eps = next((raw[k] for k in eps_keys if raw.get(k) is not None), 1e-5)
    layout = raw.get("attention_projection_layout") or "split"
    return ModelConfig(
        architecture="mimo_v2_flash",
        layer_kinds=kinds,
        is_moe=is_moe,
        full_attention=full,
        swa_attention=_mimo_attention(raw, SWA, native) if SWA in kinds else None,
        window=window_from_config(raw, native=native) if SWA in kinds else None,
        moe=_moe_spec(raw) if any(is_moe) else None,
        attention_value_scale=_positive_float(
            "attention_value_scale", 1.0 if value_scale is None else value_scale
        ),
        rms_norm_eps=_positive_float("layernorm_epsilon", eps),
        attention_bias=_bool(raw, "attention_bias", False),
        qkv_layout=layout,
        # SGLang: a fused qkv_proj is interleaved in as many TP chunks as full layers have KV heads
        fused_qkv_tp=_int(raw, "fused_qkv_tp_size", full.num_kv_heads) if layout == "fused_qkv" else 1,
        **_common_fields(raw),
    )


def _mimo_attention(raw: Mapping[str, Any], kind: str, native: bool) -> AttentionSpec:
    heads, kv_heads = _int(raw, "num_attention_heads"), _int(raw, "num_key_value_heads")
    head_dim = _int(raw, "head_dim")
    v_head_dim = _int(raw, "v_head_dim", head_dim)
    if kind == FULL:
        sinks = _bool(raw, "add_full_attention_sink_bias", False)
        return _attention_spec(raw, FULL, native, heads, kv_heads, head_dim, v_head_dim, sinks)
    if native:  # transformers: SWA layers have twice the KV heads and share every other dim
        geometry = {
            "swa_num_attention_heads": heads,
            "swa_num_key_value_heads": 2 * kv_heads,
            "swa_head_dim": head_dim,
            "swa_v_head_dim": v_head_dim,
        }
        for key, value in geometry.items():
            _require(raw.get(key, value) == value, key, raw.get(key))
    else:
        swa_head_dim = _int(raw, "swa_head_dim", head_dim)
        geometry = {
            "swa_num_attention_heads": _int(raw, "swa_num_attention_heads", heads),
            "swa_num_key_value_heads": _int(raw, "swa_num_key_value_heads"),
            "swa_head_dim": swa_head_dim,
            "swa_v_head_dim": _int(raw, "swa_v_head_dim", swa_head_dim),
        }
    swa_heads, swa_kv_heads, swa_head_dim, swa_v_head_dim = geometry.values()
    sinks = _bool(raw, "add_swa_attention_sink_bias", True)
    return _attention_spec(raw, SWA, native, swa_heads, swa_kv_heads, swa_head_dim, swa_v_head_dim, sinks)


def _parse_llama(raw: Mapping[str, Any]) -> ModelConfig:
    qwen2 = raw.get("model_type") == "qwen2"
    _require(not _bool(raw, "use_sliding_window", False), "use_sliding_window", raw.get("use_sliding_window"))
    _require(not _bool(raw, "mlp_bias", False), "mlp_bias", raw.get("mlp_bias"))
    n = _int(raw, "num_hidden_layers")
    types = raw.get("layer_types") or ["full_attention"] * n
    _require(list(types) == ["full_attention"] * n, "layer_types", types)
    heads = _int(raw, "num_attention_heads")
    hidden = _int(raw, "hidden_size")
    _require(raw.get("head_dim") is not None or hidden % heads == 0, "head_dim", None)
    head_dim = _int(raw, "head_dim", hidden // heads)
    full = _attention_spec(
        raw, FULL, False, heads, _int(raw, "num_key_value_heads", heads), head_dim, head_dim, False
    )
    return ModelConfig(
        architecture="llama",
        layer_kinds=(FULL,) * n,
        is_moe=(False,) * n,
        full_attention=full,
        swa_attention=None,
        window=None,
        rms_norm_eps=_positive_float("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
        attention_bias=qwen2 or _bool(raw, "attention_bias", False),  # Qwen2 always has q/k/v bias
        **_common_fields(raw),
    )


def _common_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    _require(raw.get("hidden_act", "silu") == "silu", "hidden_act", raw.get("hidden_act"))
    eos = raw.get("eos_token_id")
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    _require(
        all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_ids), "eos_token_id", eos
    )
    return dict(
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=_int(raw, "hidden_size"),
        intermediate_size=_int(raw, "intermediate_size"),
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        eos_token_ids=eos_ids,
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


def _attention_spec(
    raw: Mapping[str, Any],
    kind: str,
    native: bool,
    heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    has_sinks: bool,
) -> AttentionSpec:
    theta, partial = _rope(raw, kind, native)
    return AttentionSpec(heads, kv_heads, head_dim, v_head_dim, theta, int(head_dim * partial), has_sinks)


def _rope(raw: Mapping[str, Any], kind: str, native: bool) -> tuple[float, float]:
    """(theta, partial_rotary_factor) of one layer kind."""
    _check_rope_type(raw.get("rope_scaling"), "rope_scaling")
    params: Mapping[str, Any] = raw.get("rope_parameters") or {}
    _require(isinstance(params, Mapping), "rope_parameters", params)
    if _HF_KIND_NAMES[FULL] in params or _HF_KIND_NAMES[SWA] in params:  # transformers' per-kind table
        per_kind: Mapping[str, Any] = params.get(_HF_KIND_NAMES[kind]) or {}
        _require(isinstance(per_kind, Mapping) and "rope_theta" in per_kind, "rope_parameters", params)
        _check_rope_type(per_kind, "rope_parameters")
        partial = per_kind.get("partial_rotary_factor", 0.334)  # transformers' MiMo default
        return _positive_float("rope_theta", per_kind["rope_theta"]), _positive_float(
            "partial_rotary_factor", partial
        )
    _check_rope_type(params, "rope_parameters")
    if native:  # transformers ignores a flat rope_theta here and uses its per-kind defaults: say so
        _require(
            "rope_theta" not in raw and "rope_theta" not in params, "rope_parameters", "no per-kind table"
        )
        return (5_000_000.0, 0.334) if kind == FULL else (10_000.0, 0.334)
    theta = raw.get("rope_theta", params.get("rope_theta", 10_000.0))
    if kind == SWA:
        theta = raw.get("swa_rope_theta", theta)
    partial = raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    return _positive_float("rope_theta", theta), _positive_float("partial_rotary_factor", partial)


def _check_rope_type(params: object, field: str) -> None:
    if params is None:
        return
    _require(isinstance(params, Mapping), field, params)
    assert isinstance(params, Mapping)
    rope_type = params.get("rope_type", params.get("type", "default"))
    _require(rope_type == "default", field, f"rope_type={rope_type!r} is not supported")


def _mimo_layer_kinds(raw: Mapping[str, Any], n: int) -> tuple[str, ...]:
    pattern, types = raw.get("hybrid_layer_pattern"), raw.get("layer_types")
    kinds = None
    if pattern is not None:  # hub: 0 = full attention, 1 = sliding window
        _require(
            isinstance(pattern, list) and len(pattern) == n and all(p in (0, 1) for p in pattern),
            "hybrid_layer_pattern",
            pattern,
        )
        kinds = tuple(SWA if p == 1 else FULL for p in pattern)
    if types is not None:
        _require(
            isinstance(types, list) and len(types) == n and all(t in _HF_LAYER_TYPES for t in types),
            "layer_types",
            types,
        )
        from_types = tuple(_HF_LAYER_TYPES[t] for t in types)
        _require(kinds is None or kinds == from_types, "layer_types", "disagrees with hybrid_layer_pattern")
        kinds = from_types
    if kinds is None:  # transformers' default: full attention on layer 0 and every 6th layer
        kinds = tuple(FULL if i == 0 or (i + 1) % 6 == 0 else SWA for i in range(n))
    return kinds


def _mimo_moe_layers(raw: Mapping[str, Any], n: int) -> tuple[bool, ...]:
    freq, types = raw.get("moe_layer_freq"), raw.get("mlp_layer_types")
    is_moe = None
    if isinstance(freq, list):  # hub: 1 = MoE, 0 = dense
        _require(len(freq) == n and all(f in (0, 1) for f in freq), "moe_layer_freq", freq)
        is_moe = tuple(f == 1 for f in freq)
    elif freq is not None:  # DeepSeek style: every `freq`-th layer after the first dense ones
        every, first_dense = _int(raw, "moe_layer_freq"), _int(raw, "first_k_dense_replace", 0, minimum=0)
        is_moe = tuple(i >= first_dense and i % every == 0 for i in range(n))
    if types is not None:
        _require(
            isinstance(types, list) and len(types) == n and all(t in ("dense", "sparse") for t in types),
            "mlp_layer_types",
            types,
        )
        from_types = tuple(t == "sparse" for t in types)
        _require(is_moe is None or is_moe == from_types, "mlp_layer_types", "disagrees with moe_layer_freq")
        is_moe = from_types
    if is_moe is None:  # transformers' default: one dense layer, then MoE
        is_moe = tuple(i > 0 for i in range(n))
    return is_moe


def _moe_spec(raw: Mapping[str, Any]) -> MoESpec:
    _require(raw.get("topk_method") in (None, "noaux_tc"), "topk_method", raw.get("topk_method"))
    scaling = raw.get("routed_scaling_factor")  # hub configs say null: no scaling
    return MoESpec(
        num_experts=_int(raw, "n_routed_experts"),
        top_k=_int(raw, "num_experts_per_tok"),
        intermediate_size=_int(raw, "moe_intermediate_size"),
        num_shared_experts=_int(raw, "n_shared_experts", 0, minimum=0) if raw.get("n_shared_experts") else 0,
        n_group=_int(raw, "n_group", 1),
        topk_group=_int(raw, "topk_group", 1),
        norm_topk_prob=_bool(raw, "norm_topk_prob", True),
        routed_scaling_factor=1.0 if scaling is None else _positive_float("routed_scaling_factor", scaling),
        scoring_func=raw.get("scoring_func") or "sigmoid",
    )


def _int(raw: Mapping[str, Any], key: str, default: Any = _MISSING, minimum: int = 1) -> int:
    value = raw.get(key, default)
    _require(value is not _MISSING, key, "missing")
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value)
    return int(value)


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    return None if raw.get(key) is None else _int(raw, key)


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    value = default if value is None else value
    _require(isinstance(value, bool), key, value)
    return bool(value)


def _positive_float(key: str, value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    _require(ok, key, value)
    assert isinstance(value, int | float)
    return float(value)
