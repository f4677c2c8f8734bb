"""Router configuration: built once (by main.py or a test) and passed down, never mutated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.router.policy.config import PolicyConfig


@dataclass(frozen=True)
class RouterSettings:
    model_dir: Path  # tokenizer.json, tokenizer_config.json, config.json
    served_model: str  # the id /v1/models lists; requests must name it (or an alias)
    model_aliases: tuple[str, ...] = ()
    max_context: int | None = None  # None: the model's max_position_embeddings
    kv_transport: str = "grpc"  # passed to prefill workers in PrefillRequest.kv_transport
    reserve_timeout_s: float = 10.0
    prefill_timeout_s: float = 300.0
    decode_timeout_s: float = 600.0  # deadline of a whole Decode stream
    abort_timeout_s: float = 2.0
    max_attempts: int = 2  # Reserve + Prefill attempts when a worker cannot be reached
    completions_default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # routing: profiles, buckets, page size
    tool_call_parser: str = "auto"  # mimo | hermes | auto (from the chat template / config): toolcalls/

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be >= 2")

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset((self.served_model, *self.model_aliases))
