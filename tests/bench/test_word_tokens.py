"""The replay/sim word tokenizer: ids round-trip through text, other words get stable ids."""

from __future__ import annotations

import random

from bench.word_tokens import VOCAB, ids_to_text, text_to_ids, word_id


def test_ids_round_trip_through_text_at_exact_length():
    rng = random.Random(0)
    for n in (0, 1, 7, 512, 3000):
        ids = [rng.randrange(VOCAB // 2) for _ in range(n)]
        text = ids_to_text(ids)
        assert text_to_ids(text) == ids and len(text.split()) == n


def test_other_words_are_stable_and_outside_the_id_range():
    for w in ("hello", "t", "tx1", "t99999999", "Paris."):
        assert word_id(w) == word_id(w) and VOCAB // 2 <= word_id(w) < VOCAB
    assert text_to_ids("  t5\n\tt6  hello ") == [5, 6, word_id("hello")]
