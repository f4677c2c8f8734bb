"""What one prefill returns to its caller (the gRPC servicer), and what the metrics observe.

Its own module so that worker.py and metrics.py both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillResult:
    rid: str
    first_token: int
    first_logprob: float
    cached_tokens: int  # prompt tokens whose KV came from this worker's prefix cache (L1 + L2)
    kv_bytes: int  # 0 when nothing was shipped (the first token ended the request)
    finish_reason: str  # "" if the request goes on at the decode worker, else "stop" | "length"
    matched_stop: str | int | None
    queue_seconds: float
    prefill_seconds: float
    transfer_seconds: float
    cached_tokens_l2: int = 0  # of cached_tokens, restored from the host tier
    cached_tokens_l3: int = 0  # of cached_tokens, fetched from GCache (L3) through the host tier
