"""When a request stops: eos / stop token ids, stop strings, max_tokens, the model's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.engine.request import FinishReason, Req


def find_stop_string(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in text: (char index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def check_finish(
    req: Req,
    eos_ids: frozenset[int],
    max_context: int,
    decode: Callable[[list[int]], str] | None,
) -> None:
    """Mark req finished if its newest token ends it. Stop strings are cut from the text later."""
    tok = req.output_ids[-1]
    p = req.params
    if not p.ignore_eos and tok in eos_ids:
        req.finish(FinishReason.STOP, tok)
    elif tok in p.stop_token_ids:
        req.finish(FinishReason.STOP, tok)
    elif p.stop and decode is not None and (hit := _new_stop(req, decode)):
        req.finish(FinishReason.STOP, hit)
    elif len(req.output_ids) >= p.max_tokens or req.seq_len >= max_context:
        req.finish(FinishReason.LENGTH)


def _new_stop(req: Req, decode: Callable[[list[int]], str]) -> str | None:
    # A stop string that just appeared ends within the last few tokens: every token carries at least
    # one byte, so decoding the last len(stop) + 4 tokens (slack for split UTF-8) is enough.
    k = max(len(s) for s in req.params.stop) + 4
    hit = find_stop_string(decode(req.output_ids[-k:]), req.params.stop)
    return hit[1] if hit else None


def output_text(req: Req, decode: Callable[[list[int]], str]) -> str:
    """The text a client sees: stop strings and stop tokens are not part of it."""
    ids = req.output_ids
    if req.finish_reason is FinishReason.STOP and isinstance(req.matched_stop, int):
        ids = ids[:-1]
    text = decode(ids)
    if isinstance(req.matched_stop, str):
        hit = find_stop_string(text, [req.matched_stop])
        if hit is not None:
            text = text[: hit[0]]
    return text
