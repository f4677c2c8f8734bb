"""A whole completion on one simulated worker (role `both`): prefill here, decode on its own timeline.

open():  the real scheduler and radix cache run the prompt (simulated time), then the KV
         transfer to a decode pool is modelled as time, as on a disaggregated fleet: TTFT
         depends on prefill queueing only, as for swaserve's prefill/decode workers
rest():  the tokens after the first, paced by the cost model, with no contention (the decode
         pool behind the worker is assumed big enough), so every router is judged on TTFT
         and cache hits alone
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bench.sim.decode import TokenChunk, paced_tokens
from bench.sim.engine import PrefillOutcome, SimEngine
from bench.sim.stats import SimStats


class SimServing:
    def __init__(self, engine: SimEngine, stats: SimStats) -> None:
        self.engine = engine
        self.cost = engine.cost
        self.clock = engine.clock
        self.stats = stats
        self.decoding = 0  # completions past their first token, not finished yet

    async def open(self, rid: str, prompt_ids: Sequence[int]) -> PrefillOutcome:
        """The first token. ValueError (at once) for a prompt the engine refuses; PrefillFailed."""
        future = self.engine.submit(rid, prompt_ids)
        try:
            out = await future
        except asyncio.CancelledError:  # the client went away
            self.engine.abort(rid)
            raise
        await asyncio.sleep(self.cost.real_seconds(self.cost.kv_transfer_seconds(out.prompt_len)))
        return out

    async def rest(self, prompt_ids: Sequence[int], max_tokens: int) -> AsyncIterator[TokenChunk]:
        """Tokens 2..max_tokens; the last chunk has finish_reason "length". Counts the request."""
        if max_tokens <= 1:
            self.stats.served()
            return
        self.decoding += 1
        try:
            async for chunk in paced_tokens(prompt_ids, max_tokens, self.cost, self.clock):
                yield chunk
            self.stats.served()
        finally:
            self.decoding -= 1
