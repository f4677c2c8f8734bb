"""A steady open-loop load: one request every 1/rate seconds, whatever the answers do.

Requests are `/v1/completions`, streamed or plain in pairs (S S p p ..: any 4 in a row hold both
kinds), with random token-id prompts, `ignore_eos` and a fixed `max_tokens`, each on its own thread
from a pool, over real HTTP (httpx).
Each request's outcome is recorded: answered, failed with which status (or exception), a stream
cut after tokens with or without an error event, its time to first token and when it ended.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from tests.faults.fleet import MODEL


@dataclass
class Outcome:
    index: int
    stream: bool
    base: str
    sent_at: float  # time.monotonic()
    ended_at: float = 0.0
    status: str = ""  # "200", "503", ..., or an exception's name
    tokens: int = 0  # chunks with text (streams) / completion tokens (plain)
    ttft: float | None = None  # seconds to the first token (streams)
    finished: bool = False  # a finish_reason arrived (and, for a stream, [DONE])
    error_event: bool = False  # a stream carried an OpenAI error object
    detail: str = ""

    @property
    def answered(self) -> bool:
        return self.status == "200" and self.finished and not self.error_event

    @property
    def cut(self) -> bool:
        """A stream that had streamed tokens and then ended without finishing."""
        return self.stream and self.tokens > 0 and not self.answered

    @property
    def failed_before_token(self) -> bool:
        return not self.answered and self.tokens == 0


class OpenLoad:
    """`rate` requests per second to `bases` (round-robin), until stop(); join() waits for the rest."""

    def __init__(
        self, bases: list[str], rate: float, max_tokens: int = 24, prompt_len: tuple[int, int] = (48, 160),
        seed: int = 0, read_timeout: float = 60.0, keepalive: bool = True,
    ) -> None:  # fmt: skip
        self.bases = bases
        self.rate = rate
        self.max_tokens = max_tokens
        self.prompt_len = prompt_len
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=96)
        self._futures: list[Future[None]] = []
        self._client = httpx.Client(
            timeout=httpx.Timeout(10.0, read=read_timeout),
            limits=httpx.Limits(max_connections=128, max_keepalive_connections=None if keepalive else 0),
        )  # keepalive=False: a new connection per request (so a round-robin front balances requests)
        self._sender = threading.Thread(target=self._send_loop, name="open-load", daemon=True)

    def start(self) -> OpenLoad:
        self._sender.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sender.join()

    def join(self, timeout: float) -> None:
        """Wait for every request sent to end (each is bounded by the client's read timeout)."""
        deadline = time.monotonic() + timeout
        for f in self._futures:
            f.result(timeout=max(0.1, deadline - time.monotonic()))
        self._pool.shutdown()
        self._client.close()

    def _send_loop(self) -> None:
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set():
            due = t0 + k / self.rate
            if (wait := due - time.monotonic()) > 0 and self._stop.wait(wait):
                break
            prompt = [self.rng.randrange(100, 100_000) for _ in range(self.rng.randint(*self.prompt_len))]
            # S S p p S S p p ..: any 4 in a row hold both kinds, and so does every backend of a
            # 2-way round-robin front (k % 2 alone would give one of them only streams)
            stream = k // 2 % 2 == 0
            out = Outcome(k, stream=stream, base=self.bases[k % len(self.bases)], sent_at=time.monotonic())
            self.outcomes.append(out)
            self._futures.append(self._pool.submit(self._one, out, prompt))
            k += 1

    def _one(self, out: Outcome, prompt: list[int]) -> None:
        body = {
            "model": MODEL, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": out.stream,
        }  # fmt: skip
        try:
            if out.stream:
                self._stream(out, body)
            else:
                r = self._client.post(f"{out.base}/v1/completions", json=body)
                out.status = str(r.status_code)
                if r.status_code == 200:
                    choice = r.json()["choices"][0]
                    out.tokens = r.json()["usage"]["completion_tokens"]
                    out.finished = choice["finish_reason"] is not None
                else:
                    out.detail = r.text[:200]
        except Exception as e:  # noqa: BLE001 - every failure is an outcome to count
            out.status = out.status or type(e).__name__
            out.detail = f"{type(e).__name__}: {e}"[:200]
        out.ended_at = time.monotonic()

    def _stream(self, out: Outcome, body: dict[str, object]) -> None:
        with self._client.stream("POST", f"{out.base}/v1/completions", json=body) as r:
            out.status = str(r.status_code)
            if r.status_code != 200:
                out.detail = r.read().decode(errors="replace")[:200]
                return
            finish = None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.finished = finish is not None
                    return
                event = json.loads(data)
                if "error" in event:
                    out.error_event = True
                    out.detail = str(event["error"].get("message", ""))[:200]
                    continue
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        out.tokens += 1
                        if out.ttft is None:
                            out.ttft = time.monotonic() - out.sent_at
                    finish = choice.get("finish_reason") or finish
            out.detail = out.detail or "stream ended without [DONE]"
