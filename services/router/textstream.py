"""From a stream of token ids to the text a client sees, incrementally.

Two stages, each holding back what is not yet certain:

    token ids --IncrementalDetokenizer--> stable text --StopTrimmer--> text safe to send
                 holds back an incomplete      holds back a suffix that could be the start
                 UTF-8 character (U+FFFD)      of a stop string; cuts at a stop string

The concatenation of everything emitted equals the final text, whether it is streamed or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list; emits only the new stable suffix.

    ids:  [ ... | prefix_offset ... read_offset | new ids ... ]
                  ^ context, already emitted   ^ not yet emitted

    Both the context and the context + new ids are decoded from the same start, so a decoder that
    depends on context (leading spaces of SentencePiece pieces, a character split across the
    context's first token) treats them alike and the difference is exactly the new text.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: emit the rest, even an incomplete character (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return delta


class StopTrimmer:
    """Cuts the text at the earliest stop string; holds back a possible stop-string start."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._sent = 0
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        if self.matched is not None:
            return ""
        self._text += delta
        hit = self._find_stop()
        if hit is not None:
            at, self.matched = hit
            return self._emit(at)
        return self._emit(len(self._text) - self._partial_stop_len())

    def flush(self) -> str:
        return "" if self.matched is not None else self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        out = self._text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        # A stop cannot start before _sent: its start would have been held back (see feed).
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self._text.find(s, self._sent)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_stop_len(self) -> int:
        tail = self._text[self._sent :]
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:k]):
                    longest = k
                    break
        return longest


class TokenText(Protocol):
    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    bytes: bytes
    logprob: float
    text_offset: int  # characters of text before this token


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_found: str | None = None  # a stop string the router found in the text


class ChoiceText:
    """One choice's text: detokenize, hide eos / stop tokens, cut stop strings, collect logprobs."""

    def __init__(
        self, tok: TokenText, stops: Sequence[str], hidden_ids: frozenset[int], logprobs: bool
    ) -> None:
        self._tok = tok
        self._detok = IncrementalDetokenizer(tok.decode)
        self._trim = StopTrimmer(stops)
        self._hidden = hidden_ids
        self._want_logprobs = logprobs
        self._decoded_chars = 0

    @property
    def stopped(self) -> bool:
        return self._trim.matched is not None

    def push(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> TextDelta:
        if self.stopped:
            return TextDelta("", list(token_ids))
        visible = [t for t in token_ids if t not in self._hidden]
        entries = self._logprobs(token_ids, logprobs) if self._want_logprobs else []
        stable = self._detok.push(visible)
        self._decoded_chars += len(stable)
        text = self._trim.feed(stable)
        return TextDelta(text, list(token_ids), entries, self._trim.matched)

    def finish(self) -> str:
        """The held-back rest, when the choice ends."""
        if self.stopped:
            return ""
        rest = self._detok.flush()
        self._decoded_chars += len(rest)
        return self._trim.feed(rest) + self._trim.flush()

    def tokens_through(self, chars: int) -> int:
        """The fewest of the visible tokens so far whose text holds `chars` characters. Searched back
        from the newest token, doubling the step, then halving (a decoded prefix only grows with
        more tokens): a few decodes when the answer is recent, as when asked on the spot."""
        ids = self._detok.ids

        def holds(k: int) -> bool:
            return len(self._tok.decode(ids[:k])) >= chars

        hi, step = len(ids), 1
        lo = max(0, hi - step)
        while lo > 0 and holds(lo):
            hi, step = lo, step * 2
            lo = max(0, hi - step)
        while lo < hi:  # holds(hi); not holds(lo) unless lo == 0
            mid = (lo + hi) // 2
            if holds(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> list[TokenLogprob]:
        out = []
        offset = self._decoded_chars
        for i, t in enumerate(token_ids):
            if t in self._hidden:
                continue
            raw = self._tok.token_bytes(t)
            lp = float(logprobs[i]) if i < len(logprobs) else 0.0
            out.append(TokenLogprob(t, raw.decode("utf-8", errors="replace"), raw, lp, offset))
            offset += len(raw.decode("utf-8", errors="ignore"))
        return out
