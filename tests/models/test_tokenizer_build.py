"""The generated Qwen2 tokenizer.json encodes exactly like tiktoken on the qwen.tiktoken ranks."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from services.models import tokenizer_build as tb

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's, we'll, they're, I'd, you've, I'M SHOUTING",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }\t// dot",
    "x = {'a': [1, 2, 3], \"b\": None}  # 12345 + 678.90 = 1,024",
    "你好，世界！这是一个分词器测试。",
    "日本語のテキストと한국어 텍스트",
    "emoji: 🤖🎉 👍🏽 👨‍👩‍👧 ❤️",
    "   leading spaces, trailing spaces   ",
    "\n\n\nmany\n\n newlines \r\n and\ttabs\t\t",
    "          ",
    "",
    "e\u0301t\u00e9 ",  # not NFC: the normalizer composes it first, as Qwen's own encode does
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "ǅ ﬁ ① Ⅻ ² ½",
]


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return tb.cached_tokenizer_json()


@pytest.fixture(scope="session")
def ours(tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="session")
def reference():  # type: ignore[no-untyped-def]
    return tb.qwen_tiktoken_encoding()


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_tiktoken(ours: Tokenizer, reference, text: str) -> None:  # type: ignore[no-untyped-def]
    expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert ours.encode(text, add_special_tokens=False).ids == expected


def test_decode_round_trips(ours: Tokenizer) -> None:
    for text in TEXTS:
        nfc = unicodedata.normalize("NFC", text)
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == nfc


def test_vocabulary_and_special_ids(ours: Tokenizer) -> None:
    assert ours.get_vocab_size(with_added_tokens=True) == tb.VOCAB_SIZE == 151_646
    for token, token_id in tb.SPECIAL_TOKENS.items():
        assert ours.token_to_id(token) == token_id
        assert ours.encode(token, add_special_tokens=False).ids == [token_id]
    assert tb.SPECIAL_TOKENS == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def test_cache_is_reused(tokenizer_json: Path) -> None:
    before = tokenizer_json.stat().st_mtime_ns
    assert tb.cached_tokenizer_json() == tokenizer_json
    assert tokenizer_json.stat().st_mtime_ns == before


def test_written_dir_loads_with_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tb.write_qwen_tokenizer(tmp_path, model_max_length=4096)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["model_max_length"] == 4096
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok(prompt)["input_ids"][:2] == [151644, 8948]  # no BOS is prepended
    assert (
        tok("Hello, world!")["input_ids"]
        == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("Hello, world!").ids
    )
