"""Read a Hugging Face checkpoint directory (*.safetensors) as tensors under the model's parameter names.

`services.engine.models.loader.load_model` builds the `CausalLM` from them. The model's parameter
names are the published hub names. Also accepted, and rewritten to those:
  * transformers' native MiMo names: `self_attn.sinks` (hub: `self_attn.attention_sink_bias`),
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I]
    (hub: `mlp.experts.{e}.{gate,up,down}_proj.weight`);
  * MiMo-V2.5's fused `self_attn.qkv_proj.weight` (see `split_fused_qkv`);
  * block-FP8 weights (`quantization_config.quant_method: fp8`): `X.weight` in float8_e4m3fn with
    `X.weight_scale_inv`, dequantized on load.
Skipped with a log line: the MTP heads (`model.mtp.*`, not served yet) and a duplicate `lm_head.weight`
of a tied checkpoint. Anything else that does not match the model exactly — a missing tensor, an
unknown key, a wrong shape — fails the load with a ValueError naming the tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from services.models.config import AttentionSpec, ModelConfig

log = logging.getLogger(__name__)

MTP_PREFIX = "model.mtp."
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # routing stays fp32
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_FUSED_QKV = re.compile(r"^(.*\.self_attn)\.qkv_proj\.(weight|bias)$")


def read_safetensors(model_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, which the index (if any) must agree with."""
    model_dir = os.fspath(model_dir)
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    index: dict[str, str] | None = None
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)["weight_map"]
        files = sorted(set(index.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(os.path.join(model_dir, file), framework="pt") as reader:
            for name in reader.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one safetensors file")
                if index is not None and index.get(name) != file:
                    raise ValueError(f"tensor {name!r} is in {file}, but the index says {index.get(name)!r}")
                tensors[name] = reader.get_tensor(name)
    if index is not None and (missing := sorted(set(index) - set(tensors))):
        raise ValueError(f"tensor {missing[0]!r} is listed in the index but in no file")
    return tensors


def to_model_names(
    tensors: dict[str, torch.Tensor], config: ModelConfig, quantization: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the model's parameter names and layouts (see the module docstring)."""
    mtp = [name for name in tensors if name.startswith(MTP_PREFIX)]
    if mtp:
        log.info("skipping %d MTP tensors (%s*): MTP heads are not loaded yet", len(mtp), MTP_PREFIX)
    tensors = {name: t for name, t in tensors.items() if not name.startswith(MTP_PREFIX)}
    if config.tie_word_embeddings and tensors.pop("lm_head.weight", None) is not None:
        log.info("tied embeddings: ignoring the checkpoint's lm_head.weight")
    tensors = _dequantize_fp8(tensors, config, quantization)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".self_attn.sinks"):
            out[name.removesuffix("sinks") + "attention_sink_bias"] = tensor
        elif packed := _PACKED_EXPERTS.match(name):
            _unpack_experts(packed.group(1), packed.group(2), tensor, out)
        elif fused := _FUSED_QKV.match(name):
            spec = config.attention(_layer_id(name, config.num_layers))
            for proj, part in zip(
                ("q_proj", "k_proj", "v_proj"),
                split_fused_qkv(tensor, spec, config.fused_qkv_tp, name),
                strict=True,
            ):
                out[f"{fused.group(1)}.{proj}.{fused.group(2)}"] = part
        else:
            out[name] = tensor
    return out


def split_fused_qkv(
    fused: torch.Tensor, spec: AttentionSpec, tp: int, name: str = "qkv_proj"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiMo-V2.5 fused `qkv_proj` (weight [rows, hidden] or bias [rows]) -> q, k, v in head order.

    Layout (SGLang's MiMo-V2 loader; `tp` = the config's `num_key_value_heads`, i.e. the KV heads of
    a *full* layer, for SWA layers too): the rows are `tp` equal chunks, one per tensor-parallel rank
    of the exporting run, and chunk t is that rank's slice of a QKVParallelLinear:
        chunk t = [ q heads t*Hq/tp .. (t+1)*Hq/tp - 1   (Hq/tp * head_dim rows)
                    k heads of rank t                    (kv_per_rank * head_dim rows)
                    v heads of rank t                    (kv_per_rank * v_head_dim rows) ]
    with kv_per_rank = max(1, Hkv / tp). When Hkv >= tp rank t holds KV heads t*Hkv/tp ..; when
    Hkv < tp each KV head is replicated on tp/Hkv consecutive ranks and the first copy is used.
    """
    q_rows = spec.num_heads // tp * spec.head_dim
    kv_per_rank = max(1, spec.num_kv_heads // tp)
    k_rows, v_rows = kv_per_rank * spec.head_dim, kv_per_rank * spec.v_head_dim
    if fused.shape[0] != tp * (q_rows + k_rows + v_rows):
        raise ValueError(
            f"tensor {name!r}: {fused.shape[0]} rows, expected {tp} TP chunks of "
            f"{q_rows} q + {k_rows} k + {v_rows} v rows"
        )
    chunks = fused.reshape(tp, q_rows + k_rows + v_rows, *fused.shape[1:])
    ranks = range(tp) if spec.num_kv_heads >= tp else range(0, tp, tp // spec.num_kv_heads)
    q = chunks[:, :q_rows]
    k = chunks[list(ranks), q_rows : q_rows + k_rows]
    v = chunks[list(ranks), q_rows + k_rows :]
    return tuple(part.reshape(-1, *fused.shape[1:]).contiguous() for part in (q, k, v))  # type: ignore[return-value]


def check_against_model(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Names and shapes must match the model's exactly."""
    if missing := sorted(set(expected) - set(tensors)):
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unknown := sorted(set(tensors) - set(expected)):
        raise ValueError(f"checkpoint has unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """w[r, c] = weight[r, c] * scale_inv[r // block_r, c // block_c], in fp32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    if scale.shape != weight.shape:
        raise ValueError(f"scale of shape {tuple(scale_inv.shape)} does not cover a {rows}x{cols} weight")
    return weight.float() * scale


def _dequantize_fp8(
    tensors: dict[str, torch.Tensor], config: ModelConfig, quantization: Mapping[str, Any] | None
) -> dict[str, torch.Tensor]:
    scales = {name for name in tensors if name.endswith(".weight_scale_inv")}
    if scales and (quantization or {}).get("quant_method") != "fp8":
        raise ValueError(f"tensor {min(scales)!r} needs quantization_config.quant_method 'fp8'")
    block_r, block_c = (quantization or {}).get("weight_block_size") or (128, 128)
    out = {name: t for name, t in tensors.items() if name not in scales}
    for scale_name in sorted(scales):
        name = scale_name.removesuffix("_scale_inv")
        if name not in out:
            raise ValueError(f"tensor {scale_name!r} scales a weight the checkpoint does not have")
        weight, scale_inv = out[name], tensors[scale_name]
        shards = config.fused_qkv_tp if _FUSED_QKV.match(name) else 1
        per_shard_rows = -(-weight.shape[0] // shards // block_r)
        if shards > 1 and scale_inv.shape[0] == shards * per_shard_rows:  # each TP chunk quantized alone
            parts = zip(weight.chunk(shards), scale_inv.split(per_shard_rows), strict=True)
            out[name] = torch.cat([dequantize_fp8_blocks(w, s, (block_r, block_c)) for w, s in parts])
        else:
            out[name] = dequantize_fp8_blocks(weight, scale_inv, (block_r, block_c))
    if fp8 := sorted(name for name, t in out.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        raise ValueError(f"tensor {fp8[0]!r} is FP8 but has no weight_scale_inv")
    return out


def _unpack_experts(prefix: str, kind: str, packed: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """transformers' stacked experts -> one tensor per expert (gate rows precede up rows)."""
    for e, expert in enumerate(packed.unbind(0)):
        if kind == "down_proj":
            out[f"{prefix}.{e}.down_proj.weight"] = expert
        else:
            gate, up = expert.chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up


def _layer_id(name: str, num_layers: int) -> int:
    match = _LAYER.match(name)
    if match is None or int(match.group(1)) >= num_layers:
        raise ValueError(f"checkpoint has unknown tensor {name!r}")
    return int(match.group(1))
