"""Seeded random MiMo-V2-Flash checkpoints in the published Hugging Face layout.

Tensor names are those of the XiaomiMiMo/MiMo-V2-Flash safetensors (what transformers'
MiMoV2FlashForCausalLM loads after its qwen2_moe key conversion, which fuses the per-expert
matrices and renames `attention_sink_bias` to `sinks`):

    model.embed_tokens.weight [V, H]      lm_head.weight [V, H]      model.norm.weight [H]
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight [H]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    q [nh*d, H]  k [nkv*d, H]  v [nkv*dv, H]  o [H, nh*dv]
    model.layers.{i}.self_attn.attention_sink_bias [nh]           SWA layers only
    model.layers.{i}.mlp.{gate,up,down}_proj.weight               dense layers (moe_layer_freq 0)
    model.layers.{i}.mlp.gate.weight [E, H] (fp32)  mlp.gate.e_score_correction_bias [E] (fp32)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   MoE layers
    model.mtp.layers.{j}.{enorm,hnorm,input_layernorm,pre_mlp_layernorm,final_layernorm}.weight [H]
    model.mtp.layers.{j}.eh_proj.weight [H, 2H]   (input = cat(enorm(embed), hnorm(hidden)))
    model.mtp.layers.{j}.self_attn.*  (SWA geometry, with sinks)   model.mtp.layers.{j}.mlp.{gate,up,down}_proj

The MTP names follow the layout documented by vLLM's mimo_v2_mtp.py and SGLang's
mimo_v2_flash_nextn.py (transformers skips `model.mtp.*`).

Values: matrices N(0, initializer_range); RMSNorm weights 1 + N(0, 0.05); sinks N(0, 1); router
correction biases N(0, 0.05) -- all non-trivial, so a path that ignores one of them shows up.
Each tensor has its own generator seeded from (seed, name): the bytes are a function of the seed
and the geometry alone, and a tensor's values do not depend on which other tensors exist.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from services.common.kv_spec import dtype_itemsize, torch_dtype
from services.models.presets import DENSE, SWA, get_preset, transformers_mirror
from services.models.tokenizer_build import VOCAB_SIZE as TOKENIZER_VOCAB
from services.models.tokenizer_build import write_qwen_tokenizer

Init = Literal["matrix", "norm", "sink", "router_bias"]
NORM_NOISE, SINK_STD, ROUTER_BIAS_STD = 0.05, 1.0, 0.05
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Init
    fp32: bool = False  # stored in float32 whatever the checkpoint dtype (router, as published)

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def _attention(prefix: str, c: Mapping[str, Any], swa: bool) -> list[TensorSpec]:
    p = "swa_" if swa else ""
    heads, kv = c[f"{p}num_attention_heads"], c[f"{p}num_key_value_heads"]
    d, dv, hidden = c[f"{p}head_dim"], c[f"{p}v_head_dim"], c["hidden_size"]
    specs = [
        TensorSpec(f"{prefix}.q_proj.weight", (heads * d, hidden), "matrix"),
        TensorSpec(f"{prefix}.k_proj.weight", (kv * d, hidden), "matrix"),
        TensorSpec(f"{prefix}.v_proj.weight", (kv * dv, hidden), "matrix"),
        TensorSpec(f"{prefix}.o_proj.weight", (hidden, heads * dv), "matrix"),
    ]
    if c["attention_bias"]:
        specs += [
            TensorSpec(f"{prefix}.q_proj.bias", (heads * d,), "matrix"),
            TensorSpec(f"{prefix}.k_proj.bias", (kv * d,), "matrix"),
            TensorSpec(f"{prefix}.v_proj.bias", (kv * dv,), "matrix"),
        ]
    if c["add_swa_attention_sink_bias" if swa else "add_full_attention_sink_bias"]:
        specs.append(TensorSpec(f"{prefix}.attention_sink_bias", (heads,), "sink"))
    return specs


def _mlp(prefix: str, hidden: int, inner: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.gate_proj.weight", (inner, hidden), "matrix"),
        TensorSpec(f"{prefix}.up_proj.weight", (inner, hidden), "matrix"),
        TensorSpec(f"{prefix}.down_proj.weight", (hidden, inner), "matrix"),
    ]


def _moe(prefix: str, c: Mapping[str, Any]) -> list[TensorSpec]:
    experts, hidden = c["n_routed_experts"], c["hidden_size"]
    specs = [
        TensorSpec(f"{prefix}.gate.weight", (experts, hidden), "matrix", fp32=True),
        TensorSpec(f"{prefix}.gate.e_score_correction_bias", (experts,), "router_bias", fp32=True),
    ]
    for e in range(experts):
        specs += _mlp(f"{prefix}.experts.{e}", hidden, c["moe_intermediate_size"])
    return specs


def checkpoint_tensors(config: Mapping[str, Any]) -> list[TensorSpec]:
    """Every tensor of a MiMo-V2-Flash checkpoint of this (hub) config, in a fixed order."""
    c, hidden = config, config["hidden_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (c["vocab_size"], hidden), "matrix")]
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{layer}.input_layernorm.weight", (hidden,), "norm"),
            TensorSpec(f"{layer}.post_attention_layernorm.weight", (hidden,), "norm"),
        ]
        specs += _attention(f"{layer}.self_attn", c, swa=c["hybrid_layer_pattern"][i] == SWA)
        if c["moe_layer_freq"][i] == DENSE:
            specs += _mlp(f"{layer}.mlp", hidden, c["intermediate_size"])
        else:
            specs += _moe(f"{layer}.mlp", c)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not c["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (c["vocab_size"], hidden), "matrix"))
    for j in range(c.get("num_nextn_predict_layers", 0)):
        mtp = f"model.mtp.layers.{j}"
        specs += [TensorSpec(f"{mtp}.{norm}.weight", (hidden,), "norm") for norm in ("enorm", "hnorm")]
        specs.append(TensorSpec(f"{mtp}.eh_proj.weight", (hidden, 2 * hidden), "matrix"))
        specs.append(TensorSpec(f"{mtp}.input_layernorm.weight", (hidden,), "norm"))
        specs += _attention(f"{mtp}.self_attn", c, swa=True)
        specs.append(TensorSpec(f"{mtp}.pre_mlp_layernorm.weight", (hidden,), "norm"))
        specs += _mlp(f"{mtp}.mlp", hidden, c["intermediate_size"])
        specs.append(TensorSpec(f"{mtp}.final_layernorm.weight", (hidden,), "norm"))
    return specs


def sample_tensor(spec: TensorSpec, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """The values of one tensor: a function of (seed, spec) only."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**62)
    noise = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    if spec.init == "matrix":
        values = noise * std
    elif spec.init == "norm":
        values = 1.0 + NORM_NOISE * noise
    elif spec.init == "sink":
        values = SINK_STD * noise
    else:
        values = ROUTER_BIAS_STD * noise
    return values.to(torch.float32 if spec.fp32 else dtype).contiguous()


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors, each under max_shard_bytes unless one tensor alone exceeds it."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * (4 if spec.fp32 else itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def init_model(
    out_dir: str | Path,
    preset: str = "mimo-tiny",
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write config.json, model safetensors (+ index when sharded), tokenizer and generation config.

    Overrides use hub keys (see ModelPreset.config). With vocab_size below the tokenizer's 151,646
    ids, eos/pad ids must be overridden into range, and no tokenizer files are written.

    bfloat16 is the default storage (as published; halves the 87M-parameter tiny model to 175 MB,
    dominated by the 152,576 x 256 embedding and lm_head). bf16 values are exact in float32, so a
    float32 oracle loading these weights computes on exactly the stored numbers.
    """
    chosen = get_preset(preset)
    if not chosen.instantiable:
        raise ValueError(f"preset {preset!r} is geometry only; instantiate mimo-tiny (with overrides)")
    config = chosen.config(overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None and not 0 <= config[key] < config["vocab_size"]:
            raise ValueError(
                f"{key}={config[key]} outside vocab_size={config['vocab_size']}; override it too"
            )
    weights_dtype = torch_dtype(dtype)  # a ValueError naming the choices for an unknown name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specs = checkpoint_tensors(config)
    shards = plan_shards(specs, dtype_itemsize(dtype), max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {s.name: sample_tensor(s, seed, config["initializer_range"], weights_dtype) for s in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)

    _write_json(out / "config.json", {**config, **transformers_mirror(config), "torch_dtype": dtype})
    stops = [config.get("eos_token_id"), config.get("pad_token_id")]  # <|im_end|>, <|endoftext|>
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": [t for i, t in enumerate(stops) if t is not None and t not in stops[:i]],
            "pad_token_id": config.get("pad_token_id"),
        },
    )
    # A vocabulary cut below the Qwen2 ids (small test overrides) gets no tokenizer: it would emit
    # ids the embedding does not have.
    if config["vocab_size"] >= TOKENIZER_VOCAB:
        write_qwen_tokenizer(out, model_max_length=config["max_position_embeddings"])
    return out


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
