"""The tokens a simulated worker generates: deterministic per prompt, any seed, no EOS.

Output token k of a prompt is the k-th draw of a RNG seeded by the prompt's ids, so a prefill
worker (the first token) and a decode worker (the rest) of a disaggregated pair agree, and the
same prompt always gets the same completion. Ids stay clear of special tokens of real vocabularies
(Qwen2's specials sit above 151,000) so a router may detokenize them with its own tokenizer.
"""

from __future__ import annotations

import random
import zlib
from array import array
from collections.abc import Sequence

FIRST_ID = 1000  # ids drawn in [FIRST_ID, LAST_ID)
LAST_ID = 30000


def prompt_seed(prompt_ids: Sequence[int], seed: int = 0) -> int:
    return zlib.crc32(array("q", prompt_ids).tobytes()) ^ (seed * 0x9E3779B1)


def output_tokens(prompt_ids: Sequence[int], count: int, start: int = 0, seed: int = 0) -> list[int]:
    """Output tokens [start, start + count) of the completion of `prompt_ids`."""
    rng = random.Random(prompt_seed(prompt_ids, seed))
    ids = [rng.randrange(FIRST_ID, LAST_ID) for _ in range(start + count)]
    return ids[start:]
