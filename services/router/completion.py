"""The transport-free core: one job (all its choices) through the workers, as text events + usage.

    start(job)  opens every choice concurrently (Reserve + Prefill); any failure aborts the others
                and raises, so nothing has been sent to the client yet
    events()    merges the choices' text events in arrival order; a failure raises mid-stream
                (one choice, the common case, runs in the caller's task: no task or queue hop)
    complete()  start + collect, for non-streaming answers (run once more if a worker dies while
                decoding: nothing has reached the client)

Both HTTP endpoints (and any other transport) call this; it never sees a FastAPI request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Collection
from contextlib import aclosing

from services.router.dispatch import Dispatcher, Generation, HeldAborts
from services.router.errors import RouterError, WorkerUnavailable
from services.router.job import ChoiceEvent, ChoiceResult, CompletionJob, Usage
from services.router.metrics import RouterMetrics
from services.router.textstream import ChoiceText, TokenText

log = logging.getLogger("swaserve.router.completion")

NON_STREAMED_RERUNS = 1  # a non-streamed request runs again at most this often after a worker death


class CompletionCore:
    def __init__(
        self, dispatcher: Dispatcher, tok: TokenText, eos_token_ids: frozenset[int], metrics: RouterMetrics
    ) -> None:
        self.dispatcher = dispatcher
        self.tok = tok
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics

    def hold_aborts(self) -> HeldAborts:
        """Aborts of the caller's requests wait for the handle's release (Dispatcher.hold_aborts)."""
        return self.dispatcher.hold_aborts()

    async def start(
        self, job: CompletionJob, arrival: float | None = None, avoid: Collection[str] = ()
    ) -> CompletionRun:
        """`avoid`: worker addresses that failed an earlier run of the job."""
        run = CompletionRun(self, job, time.monotonic() if arrival is None else arrival, avoid)
        await run.open()
        return run

    async def complete(
        self, job: CompletionJob, arrival: float | None = None
    ) -> tuple[list[ChoiceResult], Usage]:
        """A non-streamed answer. Nothing reaches the client before the whole answer, so when a
        worker dies while decoding (WorkerUnavailable from its stream: the dispatcher probes it and
        marks it down) the request runs once more from the start on the workers left; the client
        sees one answer. Other errors, and a second death, are the client's answer."""
        failed: set[str] = set()
        for attempt in range(1 + NON_STREAMED_RERUNS):
            run = await self.start(job, arrival, failed)
            results = [ChoiceResult(i) for i in range(job.num_choices)]
            try:
                async with aclosing(run.events()) as events:
                    async for ev in events:
                        results[ev.index].add(ev)
            except WorkerUnavailable as e:
                run.close()
                failed.update(run.decode_addrs)  # the one that died among them (one for n = 1)
                if attempt == NON_STREAMED_RERUNS:
                    raise
                self.metrics.retries.inc()
                log.warning("completion %s: %s while decoding; running it again", run.id, e)
                continue
            return results, run.usage()
        raise AssertionError("unreachable")


class CompletionRun:
    def __init__(
        self, core: CompletionCore, job: CompletionJob, arrival: float, avoid: Collection[str] = ()
    ) -> None:
        self._core = core
        self.job = job
        self.arrival = arrival
        self._avoid = avoid
        self.id = uuid.uuid4().hex
        self._gens: list[Generation] = []
        self._completion_tokens = [0] * job.num_choices
        self._reasoning_tokens = [0] * job.num_choices

    async def open(self) -> None:
        if self.job.num_choices == 1:  # a failure inside aborts what it reserved (Dispatcher.open)
            self._gens = [await self._open_one(0)]
            return
        tasks = [asyncio.ensure_future(self._open_one(i)) for i in range(self.job.num_choices)]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # client gone: children are cancelled; close those that opened
            for t in tasks:
                t.add_done_callback(_close_if_opened)
            raise
        gens = [o for o in outcomes if isinstance(o, Generation)]
        errors = [o for o in outcomes if not isinstance(o, Generation)]
        if errors:
            for g in gens:
                g.close()
            raise next((e for e in errors if isinstance(e, RouterError)), errors[0])
        self._gens = gens

    async def _open_one(self, index: int) -> Generation:
        job = self.job
        prompt = job.prompts[index // job.n]
        gen = await self._core.dispatcher.open(
            f"{self.id}-{index}", prompt, job.choice_sampling(index % job.n), self._avoid
        )
        m = self._core.metrics
        m.ttft.labels(bucket=m.bucket_of(len(prompt))).observe(time.monotonic() - self.arrival)
        m.observe_prefill(len(prompt), gen.cached_tokens, gen.cached_tokens_l2, gen.cached_tokens_l3)
        return gen

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        if len(self._gens) == 1:
            async with aclosing(self._choice_events(0, self._gens[0])) as events:
                async for ev in events:
                    yield ev
            self._observe_e2e()
            return
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._pump(i, g, queue)) for i, g in enumerate(self._gens)]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            self._observe_e2e()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their cleanup sends the Aborts

    def _observe_e2e(self) -> None:
        m = self._core.metrics
        first = self.job.prompts[0] if self.job.prompts else []
        m.e2e.labels(bucket=m.bucket_of(len(first))).observe(time.monotonic() - self.arrival)

    @property
    def decode_addrs(self) -> set[str]:
        """The decode workers this run's sequences went to."""
        return {g.decode_addr for g in self._gens}

    def close(self) -> None:
        """Abort every sequence still open (idempotent; a no-op after events() ran to the end)."""
        for g in self._gens:
            g.close()

    def usage(self) -> Usage:
        job = self.job
        cached = l2 = l3 = 0
        for p in range(len(job.prompts)):
            gens = self._gens[p * job.n : (p + 1) * job.n]
            least = min(gens, key=lambda g: g.cached_tokens, default=None)  # what the prompt surely had
            if least is not None:
                cached += least.cached_tokens
                l2 += least.cached_tokens_l2
                l3 += least.cached_tokens_l3
        return Usage(
            prompt_tokens=sum(len(p) for p in job.prompts),
            completion_tokens=sum(self._completion_tokens),
            cached_tokens=cached,
            cached_tokens_l2=l2,
            cached_tokens_l3=l3,
            reasoning_tokens=sum(self._reasoning_tokens),
        )

    async def _pump(
        self, index: int, gen: Generation, queue: asyncio.Queue[ChoiceEvent | BaseException | None]
    ) -> None:
        try:
            async with aclosing(self._choice_events(index, gen)) as events:
                async for ev in events:
                    await queue.put(ev)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(e)
            return
        await queue.put(None)

    async def _choice_events(self, index: int, gen: Generation) -> AsyncGenerator[ChoiceEvent, None]:
        """One choice's text events, until its finish reason; the metrics once it ended."""
        sampling = self.job.choice_sampling(index % self.job.n)
        hidden = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else self._core.eos_token_ids
        )
        text = ChoiceText(self._core.tok, sampling.stop, hidden, sampling.logprobs)
        out = self.job.output.start() if self.job.output is not None else None
        reasoning_tokens: int | None = None
        m = self._core.metrics
        bucket = m.bucket_of(len(self.job.prompts[index // self.job.n]))
        first_at = last_at = time.monotonic()
        async with aclosing(gen.chunks()) as chunks:
            async for chunk in chunks:
                now = time.monotonic()
                if self._completion_tokens[index] and chunk.token_ids:  # not the first token's chunk
                    m.itl.labels(bucket=bucket).observe((now - last_at) / len(chunk.token_ids))
                last_at = now
                self._completion_tokens[index] += len(chunk.token_ids)
                delta = text.push(chunk.token_ids, chunk.logprobs)
                finish = "stop" if delta.stop_found else chunk.finish_reason
                new_text = delta.text + (text.finish() if finish else "")
                pieces = None
                if out is not None:
                    pieces = out.feed(new_text) + (out.finish() if finish else [])
                    finish = "tool_calls" if finish == "stop" and out.called else finish
                    if reasoning_tokens is None and out.reasoning_end is not None:  # it just ended
                        reasoning_tokens = text.tokens_through(out.reasoning_end)
                yield ChoiceEvent(index, new_text, chunk.token_ids, delta.logprobs, finish, pieces)
                if finish:
                    break  # closing the chunks aborts the sequence if the worker has not ended it
        tokens = self._completion_tokens[index]
        if out is not None and out.saw_reasoning:
            self._reasoning_tokens[index] = tokens if reasoning_tokens is None else reasoning_tokens
        m.completion_tokens.inc(tokens)
        if tokens > 1:
            m.tpot.labels(bucket=bucket).observe((time.monotonic() - first_at) / (tokens - 1))


def _close_if_opened(task: asyncio.Future[Generation]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
