"""SmolLM2-135M-Instruct imported from its Q4_1 GGUF: exact dequantisation, a working model and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.models.gguf_import import hf_name, import_gguf, smollm2_gguf_path, unpermute_rotary
from services.models.gguf_reader import GGMLType, GGUFFile, dequantize

TEXTS = [
    "What is the capital of France?",
    "The year 2024 had 366 days; pi is about 3.14159, and 1,000,000 > 999.",
    "def f(x):\n    return x ** 2  # square\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading,   multiple   and trailing spaces  ",
    "naïve café — “quotes” and ‘apostrophes’",
    "你好世界, 🤖 emoji 👍🏽",
    "tabs\tand\nnewlines\r\n",
    "it's we'll they're I'M",
]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    return import_gguf(tmp_path_factory.mktemp("smollm2"), gguf_path)


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF rotate-half rows -> GGML interleaved pairs)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_dequantisation_equals_the_gguf_package(gguf_path: Path) -> None:
    import gguf

    reference = gguf.GGUFReader(str(gguf_path))
    kinds = set()
    with GGUFFile(gguf_path) as ours:
        assert len(ours.tensors) == len(reference.tensors) == 272
        for tensor in reference.tensors:
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            got = ours.dequantize(tensor.name)
            assert got.shape == expected.shape and np.array_equal(got, expected), tensor.name
            kinds.add(GGMLType(ours.tensors[tensor.name].ggml_type))
    assert kinds == {GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F32}


@pytest.mark.parametrize("kind", [GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1])
def test_dequantize_matches_gguf_on_synthetic_data(kind: GGMLType) -> None:
    import gguf

    values = np.random.default_rng(int(kind)).standard_normal((4, 64)).astype(np.float32)
    packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(kind)))
    expected = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType(int(kind)))
    assert np.array_equal(dequantize(packed.reshape(-1).view(np.uint8), kind, (4, 64)), expected)


def test_metadata(gguf_path: Path) -> None:
    with GGUFFile(gguf_path) as f:
        meta = f.metadata
        assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
        assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
        assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")
        assert f.tensors["token_embd.weight"].shape == (49152, 576)
        assert "output.weight" not in f.tensors  # tied embeddings


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    hf = np.arange(n_head * 64 * 5, dtype=np.float32).reshape(n_head * 64, 5)
    assert np.array_equal(unpermute_rotary(_llama_cpp_permute(hf, n_head), n_head), hf)
    assert not np.array_equal(_llama_cpp_permute(hf, n_head), hf)


def test_names() -> None:
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(KeyError):
        hf_name("blk.0.attn_q_norm.weight")


def test_config_from_metadata(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected


@pytest.fixture(scope="session")
def hf_model(converted: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    loaded: Any = LlamaForCausalLM.from_pretrained(converted, output_loading_info=True, dtype=torch.float32)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model, AutoTokenizer.from_pretrained(converted)


def test_answers_paris(hf_model: tuple[Any, Any]) -> None:
    model, tok = hf_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tok.decode(inputs["input_ids"][0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_matches_transformers_gguf_loading(converted: Path, gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert ours.chat_template == reference.chat_template
    assert ours.decode(ours("naïve café 你好")["input_ids"]) == "naïve café 你好"


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loading(converted: Path, gguf_path: Path) -> None:
    pytest.importorskip("accelerate")  # transformers needs it to read a GGUF model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    expected = ref.state_dict()
    for name, tensor in load_file(str(converted / "model.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name
