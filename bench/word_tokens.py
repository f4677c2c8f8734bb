"""The word tokenizer shared by trace replay (text prompts) and the simulated workers.

One whitespace-separated word is one token: token id N is the word `t<N>`, any other word maps to a
stable id by hash. Replay builds text prompts of exactly `input_length` tokens with it, and a
simulated worker counts (and hashes into cache blocks) exactly those tokens, so routers that only
see text (sglang-router, vllm-router) and routers that see ids route the same prompts.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

VOCAB = 1 << 20  # ids are below this; words not of the form t<N> hash into [VOCAB // 2, VOCAB)


def ids_to_text(ids: Iterable[int]) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def word_id(word: str) -> int:
    if len(word) > 1 and word[0] == "t" and word[1:].isdigit():
        n = int(word[1:])
        if n < VOCAB:
            return n
    return VOCAB // 2 + zlib.crc32(word.encode()) % (VOCAB // 2)


def text_to_ids(text: str) -> list[int]:
    return [word_id(w) for w in text.split()]
