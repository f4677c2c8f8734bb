"""The routing pipeline's parts: what a policy sees, three small plugin bases, and a Profile.

    candidates --filters--> survivors --scorers (weighted)--> scores --picker--> Ranking (best first)

- A `Filter` drops candidates; it never returns an empty list when it was given a non-empty one
  unless no candidate can serve at all (filters here fall back rather than strand a request).
- A `Scorer` returns one number per candidate, each in [0, 1], higher = better (a scorer whose
  scale differs says so in its docstring). The profile's score is the weighted sum.
- A `Picker` orders the candidates by score; ties are broken deterministically (pick.py), never by
  per-replica state, so two routers seeing the same Redis state rank the same way.

Plugins register by name (`name = "..."` on the subclass) and are built with the PolicyConfig, so a
profile is composed from config: `Profile.build(ProfileSpec, PolicyConfig)`.
Nothing here imports torch or touches the network; a policy never sees an HTTP request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from services.common.block_hash import BlockHash
from services.router.policy.config import PolicyConfig, ProfileSpec


@dataclass(frozen=True, slots=True)
class Candidate:
    """A worker as the policy sees it: identity, labels, and its load as last published to Redis.

    `has_load` is False for workers known only by address (a static pool): their load fields are
    zeros that mean "unknown", and load-based scorers treat them as equal.
    """

    worker_id: str  # the registry's worker_id: the key of the prefix index
    addr: str  # gRPC host:port
    role: str = "prefill"
    model: str = ""
    bucket: str = ""  # labels["bucket"]; "" = serves every length
    running: int = 0  # requests
    waiting: int = 0  # requests
    free_kv_tokens: int = 0
    queued_tokens: int = 0  # prompt tokens admitted or waiting, not computed yet
    capacity_tokens: int = 0
    tokens_per_s: float = 0.0  # labels["prefill_tokens_per_s"]; 0 = the config's
    has_load: bool = False
    healthy: bool = True
    incarnation: str = ""  # the registry record's start_id: fences residency of an earlier process
    updated_at: float = 0.0  # wall clock of the load report (pending entries after it add to it)

    @property
    def running_tokens(self) -> int:
        """KV tokens held by live requests (capacity minus what the pool can still give)."""
        return max(0, self.capacity_tokens - self.free_kv_tokens) if self.has_load else 0

    @property
    def load_tokens(self) -> int:
        return self.queued_tokens + self.running_tokens


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A worker's cached prefix of the request, in blocks (pages). `raw_blocks` have full-attention
    KV; `safe_blocks` <= raw_blocks also have SWA KV for the window before their end (routable).
    `l2_blocks`: the safe prefix the worker could restore from its host tier (>= safe_blocks if set)."""

    raw_blocks: int = 0
    safe_blocks: int = 0
    l2_blocks: int = 0


NO_HIT = PrefixHit()


@dataclass(frozen=True)
class RouteRequest:
    """One routing question: the prompt (as lengths and block hashes) and what the index knows."""

    prompt_len: int
    max_tokens: int
    block_hashes: Sequence[BlockHash]
    page_size: int
    key: bytes  # identifies the prompt; seeds the deterministic tie-break
    matches: Mapping[str, PrefixHit] = field(default_factory=dict)  # by worker_id
    l3_blocks: int = 0  # safe prefix in the cluster-wide L3 tier (GCache), any worker can load it
    index_usable: bool = False
    model: str = ""  # the router's model; "" = any
    cached_pages: Mapping[str, int] = field(default_factory=dict)  # by worker_id: its cache's footprint

    @property
    def query_blocks(self) -> int:
        return len(self.block_hashes)

    def hit(self, c: Candidate) -> PrefixHit:
        return self.matches.get(c.worker_id) or self.matches.get(c.addr) or NO_HIT

    def tokens(self, blocks: int) -> int:
        """Prompt tokens covered by `blocks` full pages."""
        return min(blocks * self.page_size, self.prompt_len)


@dataclass
class Trace:
    """What the filters noted on the way (bucket chosen, fallback), for the decision's reason."""

    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranking:
    ordered: tuple[Candidate, ...]  # best first
    scores: Mapping[str, float]  # by worker_id
    notes: Mapping[str, str]

    @property
    def best(self) -> Candidate | None:
        return self.ordered[0] if self.ordered else None


P = TypeVar("P", bound="Plugin")


class Plugin:
    """Base of filters, scorers and pickers: a registry name and the config it was built with."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Any]]]

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "registry" in cls.__dict__:
            return  # a kind's base: owns the registry
        if cls.name:
            if cls.name in cls.registry:
                raise ValueError(f"{cls.kind} {cls.name!r} is registered twice")
            cls.registry[cls.name] = cls

    @classmethod
    def make(cls: type[P], name: str, config: PolicyConfig) -> P:
        try:
            plugin: P = cls.registry[name](config)
        except KeyError:
            raise ValueError(f"unknown {cls.kind} {name!r} (known: {sorted(cls.registry)})") from None
        return plugin


class Filter(Plugin):
    kind = "filter"
    registry: ClassVar[dict[str, type[Any]]] = {}

    def apply(self, req: RouteRequest, cands: list[Candidate], trace: Trace) -> list[Candidate]:
        raise NotImplementedError


class Scorer(Plugin):
    kind = "scorer"
    registry: ClassVar[dict[str, type[Any]]] = {}
    reads_l2: ClassVar[bool] = False  # reads PrefixHit.l2_blocks (the router then matches the L2 index)

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        """One value per candidate, in [0, 1] unless the subclass documents another scale."""
        raise NotImplementedError


class Picker(Plugin):
    kind = "picker"
    registry: ClassVar[dict[str, type[Any]]] = {}

    def order(self, req: RouteRequest, cands: Sequence[Candidate], scores: Sequence[float]) -> list[int]:
        """Indices of `cands`, best first."""
        raise NotImplementedError


T = TypeVar("T")


@dataclass(frozen=True)
class Weighted(Generic[T]):
    plugin: T
    weight: float


class Profile:
    """filters -> weighted scorers -> picker, for one role."""

    def __init__(
        self, name: str, filters: Sequence[Filter], scorers: Sequence[Weighted[Scorer]], picker: Picker
    ) -> None:
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)
        self.picker = picker

    @classmethod
    def build(cls, name: str, spec: ProfileSpec, config: PolicyConfig) -> Profile:
        return cls(
            name,
            [Filter.make(f, config) for f in spec.filters],
            [Weighted(Scorer.make(s, config), w) for s, w in spec.scorers],
            Picker.make(spec.picker, config),
        )

    @property
    def reads_l2(self) -> bool:
        """Whether a scorer with a weight reads the workers' host-tier (L2) matches."""
        return any(ws.plugin.reads_l2 and ws.weight != 0.0 for ws in self.scorers)

    def rank(self, req: RouteRequest, cands: Sequence[Candidate]) -> Ranking:
        trace = Trace()
        survivors = list(cands)
        for f in self.filters:
            if not survivors:
                break
            survivors = f.apply(req, survivors, trace)
        totals = [0.0] * len(survivors)
        for ws in self.scorers:
            if ws.weight == 0.0:
                continue
            for i, v in enumerate(ws.plugin.score(req, survivors)):
                totals[i] += ws.weight * v
        order = self.picker.order(req, survivors, totals)
        ordered = tuple(survivors[i] for i in order)
        scores = {survivors[i].worker_id: totals[i] for i in order}
        return Ranking(ordered, scores, trace.notes)
