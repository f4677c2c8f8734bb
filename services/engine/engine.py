"""The engine: a model, its two KV pools, the radix cache, the scheduler and the sampler, in one loop.

    add_request() -> waiting queue   (with L3: first a background L3 lookup; see below)
    step():  schedule a packed batch -> forward -> sample the requests that reached their end
             -> commit KV (prompt ends go to the radix cache) -> finish what stopped

Tiers (docs/kv-tiers.md): L1 is the pools and the radix cache; L2 (`host_kv_tokens`) host memory,
written through whenever the radix cache takes a prefix, restored at admission; L3 (`attach_l3`,
GCache) gets the same writes in the background, and a new request whose prompt goes past what L1
and L2 hold is *staged* while its pages are fetched from L3 into L2; then it joins the queue and
admission restores it from L2 like any L2 hit. The loop never waits on the network.

The prefill and decode services wrap this loop; `generate()` runs it to completion.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.block_hash import BlockHash
from services.common.kv_payload import KVPayload
from services.common.kv_spec import dtype_itemsize, torch_dtype
from services.common.sampling_params import SamplingParams
from services.engine.bookkeeping import BookkeepingConfig, build_bookkeeping
from services.engine.kv.host_tier import SpillJob
from services.engine.kv.req_pages import ReqPages
from services.engine.l3_tier import L3Fetch, L3Store, L3Tier, namespace
from services.engine.models.causal_lm import CausalLM
from services.engine.models.model_runner import ModelRunner
from services.engine.request import Req, ReqStatus
from services.engine.sampling import Sampled, Sampler
from services.engine.stop_check import check_finish, output_text
from services.engine.tensors.host_store import HostKVStore
from services.engine.tensors.kv_bytes import page_nbytes, read_pages, write_pages
from services.engine.tensors.kv_store import KVStore
from services.engine.tensors.kv_transfer import export_kv, install_kv
from services.engine.tensors.layer_restore import LayerwiseRestore


@dataclass
class _Staged:
    """A request waiting for its L3 lookup before it joins the queue."""

    req: Req
    fetch: Future[L3Fetch | None]
    deadline: float


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    max_total_tokens: int = 32768  # capacity of the full-attention pool, in tokens
    swa_pages: int | None = None  # default: room for max_running windows plus as many cached tails
    chunk_size: int = 512
    max_batch_tokens: int = 2048
    max_running: int = 32
    queue_policy: str = "fcfs"
    enable_prefix_cache: bool = True
    host_kv_tokens: int = 0  # L2: full-attention tokens the host tier holds (0: no L2)
    host_swa_pages: int | None = None  # L2 SWA pages for cached tails (default: as many as full pages)
    layerwise_restore: bool = True  # L2 -> device copies overlap the forward, layer by layer
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        dtype_itemsize(self.dtype)  # a ValueError naming the choices for an unknown name
        if self.max_total_tokens < self.page_size:
            raise ValueError("max_total_tokens must hold at least one page")


def swa_window(model_cfg: Any) -> int:
    """Previous tokens an SWA query sees; 0 for a model without SWA layers (no SWA KV is kept)."""
    return int(model_cfg.window) if model_cfg.window is not None else 0


class Engine:
    def __init__(self, model: CausalLM, model_cfg: Any, cfg: EngineConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        p = cfg.page_size
        self.window = swa_window(model_cfg)
        bk = build_bookkeeping(BookkeepingConfig.of(cfg, window=self.window))
        self.full_pool, self.swa_pool, self.cache, self.events = bk.full_pool, bk.swa_pool, bk.cache, bk.events
        self.scheduler, self.host, self.host_events = bk.scheduler, bk.host, bk.host_events
        num_full, num_swa = self.full_pool.num_pages, self.swa_pool.num_pages
        self.store = KVStore(list(model_cfg.kv_specs), num_full, num_swa, p, torch_dtype(cfg.dtype), cfg.device)
        self.host_store: HostKVStore | None = None  # L2's bytes, beside the host tier's bookkeeping
        if self.host is not None:
            host_full, host_swa = self.host.full_pool.num_pages, self.host.swa_pool.num_pages
            self.host_store = HostKVStore(list(model_cfg.kv_specs), host_full, host_swa, p, torch_dtype(cfg.dtype))
        self.l3: L3Tier | None = None
        self.l3_wait = 2.0  # seconds a request waits for its L3 lookup before it is queued without it
        self._staged: dict[str, _Staged] = {}
        self._restore_pool: ThreadPoolExecutor | None = None
        self.runner = ModelRunner(model, self.store, cfg.device)
        self.sampler = Sampler(cfg.seed)
        self.eos_ids = frozenset(model_cfg.eos_token_ids)
        self.max_context = int(model_cfg.max_position_embeddings)
        self._ids = itertools.count()
        # called with (req, fp32 logits [vocab]) for every sampled position; e.g. to dump prompt logits
        self.logits_hook: Callable[[Req, torch.Tensor], None] | None = None
        # called with a request that just finished, before its pages are released (e.g. to export KV)
        self.finish_hook: Callable[[Req], None] | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: EngineConfig | None = None) -> Engine:
        from tokenizers import Tokenizer

        from services.engine.models.loader import load_model

        cfg = cfg or EngineConfig()
        model = load_model(model_dir, dtype=torch_dtype(cfg.dtype), device=cfg.device)
        tok_path = Path(model_dir) / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
        return cls(model, model.config, cfg, tokenizer)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, rid: str | None = None) -> Req:
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("prompt must contain at least one token")
        vocab = int(self.model_cfg.vocab_size)
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_context:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_context} "
                "(prompt plus at least one generated token)"
            )
        if len(ids) + 1 > self.full_pool.num_pages * self.cfg.page_size:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the KV pool holds {self.full_pool.num_pages * self.cfg.page_size}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        req = Req(rid=rid or f"req-{next(self._ids)}", prompt_ids=ids, params=params)
        if not self._stage(req):
            self.scheduler.add(req)
        return req

    # -- L3 ------------------------------------------------------------------------------------
    def attach_l3(self, store: L3Store, model: str, max_inflight_bytes: int = 256 << 20) -> L3Tier:
        """Use a GCache cluster (a GCacheClient) as L3 behind L2; needs the host tier.
        `model` names the weights: workers share blocks only within one name."""
        if self.host is None:
            raise ValueError("L3 needs the host tier (L2): set host_kv_tokens")
        specs = self.store.specs
        ns = namespace(model, specs, self.window, self.cfg.dtype, self.cfg.page_size)
        self.l3 = L3Tier(
            store, ns,
            full_nbytes=page_nbytes(specs, "full", self.cfg.page_size, self.store.dtype),
            swa_page_nbytes=page_nbytes(specs, "swa", self.cfg.page_size, self.store.dtype),
            tail_pages=self.host.tail_pages, max_inflight_bytes=max_inflight_bytes,
        )  # fmt: skip
        return self.l3

    def _stage(self, req: Req) -> bool:
        """Start req's L3 lookup if its prompt goes past what L1 and L2 can restore; True if staged."""
        if self.l3 is None or self.host is None:
            return False
        beyond = self.scheduler.beyond_host(req)
        if beyond is None:
            return False
        hashes, start, room = beyond
        fetch = self.l3.fetch(hashes, start, room)
        self._staged[req.rid] = _Staged(req, fetch, time.monotonic() + self.l3_wait)
        return True

    def _admit_staged(self) -> None:
        """Queue the staged requests whose lookup ended (or timed out), installing what it found."""
        now = time.monotonic()
        for rid, st in list(self._staged.items()):
            if not st.fetch.done() and now < st.deadline:
                continue
            del self._staged[rid]
            if st.fetch.done() and st.fetch.exception() is None:
                got = st.fetch.result()
                if got is not None:
                    self._install_l3(st.req, got)
            self.scheduler.add(st.req)

    def _install_l3(self, req: Req, got: L3Fetch) -> None:
        """L3 -> L2: claim host pages for the fetched blocks and copy them in (engine thread)."""
        assert self.host is not None and self.host_store is not None
        p = self.cfg.page_size
        hashes = [BlockHash(h) for h in req.page_hashes]
        hs = self.host_store
        full, hps = self.host.install(hashes, got.start, got.end, req.all_ids)
        for hp, value in zip(full, got.full, strict=True):
            if hp is not None:
                write_pages(hs.k, hs.v, hs.specs, "full", p, [hp], value)
        if hps is not None:
            write_pages(hs.k, hs.v, hs.specs, "swa", p, hps, got.tail)
        req.l3_span = (got.start, got.end)

    def _write_down_l3(self, jobs: Sequence[SpillJob]) -> None:
        """What went to L2 this step goes to L3 too, copied from the device now, sent in the background.
        From the device, not from the host copy just made: a host page claimed twice in one step
        holds only the later job's bytes (_run_spills), the device pages hold each job's own."""
        assert self.l3 is not None
        p = self.cfg.page_size
        st = self.store
        items = []
        for job in jobs:
            rows = read_pages(st.k, st.v, st.specs, job.kind, p, job.device).numpy()
            if job.kind == "full":
                items += [(self.l3.key_full(k), rows[i]) for i, k in enumerate(job.keys)]
            else:
                items.append((self.l3.key_tail(job.keys[0]), rows.reshape(-1)))
        self.l3.write(items)

    def staged_reqs(self) -> list[Req]:
        return [st.req for st in self._staged.values()]

    # -- disaggregation: KV out of a prefill engine, into a decode engine -----------------------
    def export_kv(self, req: Req) -> KVPayload:
        """The KV of req's computed tokens (full: all, SWA: the window); call from finish_hook."""
        if req.pages is None:
            raise RuntimeError(f"{req.rid} holds no KV")
        return export_kv(self.store, req.pages, req.rid)

    def free_tokens(self) -> int:
        """Tokens of KV the full pool could still take (free pages plus what the cache can give back)."""
        return (self.full_pool.num_free + self.cache.evictable_full_pages()) * self.cfg.page_size

    def add_prefilled(
        self, prompt_ids: Sequence[int], first: Sampled, payload: KVPayload, params: SamplingParams
    ) -> Req:
        """Continue a request whose prompt was prefilled elsewhere: install its KV, decode from here.

        Raises OutOfPages (after evicting what the cache can give) if the pools cannot take it.
        """
        ids = list(prompt_ids)
        if payload.meta.num_tokens != len(ids):
            raise ValueError(f"KV covers {payload.meta.num_tokens} tokens, the prompt has {len(ids)}")
        req = Req(rid=payload.meta.rid, prompt_ids=ids, params=params)
        pages = ReqPages(self.full_pool, self.swa_pool, self.window)
        need_full, need_swa = pages.new_pages_needed(len(ids))
        self.cache.evict_full(max(0, need_full - self.full_pool.num_free))
        self.cache.evict_swa(max(0, need_swa - self.swa_pool.num_free))
        install_kv(self.store, pages, payload)
        req.pages = pages
        req.computed_len = len(ids)
        req.prompt_tail_cached = True  # the prompt's KV lives at the prefill worker's cache
        req.output_ids.append(first.token_id)
        req.output_logprobs.append(first.logprob)
        self.sampler.skip(req.rid, params, int(self.model_cfg.vocab_size))
        check_finish(
            req, self.eos_ids, self.max_context, self.decode_ids if self.tokenizer is not None else None
        )
        if req.finished:
            pages.release_all()
            req.pages = None
            return req
        self.scheduler.add_running(req)
        return req

    def abort(self, req: Req) -> None:
        from services.engine.request import FinishReason

        req.finish(FinishReason.ABORT)
        self._staged.pop(req.rid, None)  # its lookup's result, if any, is dropped
        self.scheduler.finish(req)
        self.sampler.forget(req.rid)
        self._run_spills()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._staged)

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[Req]:
        """One forward. Returns the requests that got a token (finished ones included)."""
        if self._staged:
            self._admit_staged()
        batch = self.scheduler.schedule()
        if not batch:
            if self._staged:  # nothing to compute until a lookup ends: wait for one, briefly
                wait([st.fetch for st in self._staged.values()], timeout=0.01, return_when=FIRST_COMPLETED)
            return []
        restore = self._start_restores(batch)
        try:
            logits = self.runner.forward(batch, restore)
        finally:
            if restore is not None:
                restore.finish()
        sampling = [st for st in batch if st.samples]
        picked = self.sampler.sample(
            logits, [st.req.rid for st in sampling], [st.req.params for st in sampling]
        )
        for st in batch:
            self.scheduler.commit(st)
        decode = self.decode_ids if self.tokenizer is not None else None
        for row, (st, s) in enumerate(zip(sampling, picked, strict=True)):
            req = st.req
            if self.logits_hook is not None:
                self.logits_hook(req, logits[row])
            req.output_ids.append(s.token_id)
            req.output_logprobs.append(s.logprob)
            check_finish(req, self.eos_ids, self.max_context, decode)
            if req.status is ReqStatus.FINISHED:
                if self.finish_hook is not None:
                    self.finish_hook(req)
                self.scheduler.finish(req)
                self.sampler.forget(req.rid)
        self._run_spills()
        return [st.req for st in sampling]

    def _start_restores(self, batch: list[Any]) -> LayerwiseRestore | None:
        """L2 -> L1 for the requests just admitted with a host hit, before the forward reads them:
        layer by layer beside the forward (layer_restore.py), or all of it now."""
        jobs = [st.req.restore for st in batch if st.req.restore is not None]
        for st in batch:
            st.req.restore = None
        if not jobs:
            return None
        assert self.host_store is not None
        if self.cfg.layerwise_restore:
            if self._restore_pool is None:
                self._restore_pool = ThreadPoolExecutor(1, thread_name_prefix="layer-restore")
            return LayerwiseRestore(self.host_store, self.store, jobs, self._restore_pool)
        for job in jobs:
            self.host_store.load(self.store, "full", job.full_host, job.full_device)
            self.host_store.load(self.store, "swa", job.swa_host, job.swa_device)
        return None

    def _run_spills(self) -> None:
        """L1 -> L2 write-through of what the radix cache took this step (in order: a host page
        claimed twice holds the later copy, as its key says)."""
        jobs, self.scheduler.spills = self.scheduler.spills, []
        if not jobs or self.host_store is None:
            return
        for kind in ("full", "swa"):
            last: dict[int, int] = {}  # host page -> device page, the later job wins
            for job in jobs:
                if job.kind == kind:
                    last.update(zip(job.host, job.device, strict=True))
            if last:
                self.host_store.save(self.store, kind, list(last.values()), list(last.keys()))
        if self.l3 is not None:
            self._write_down_l3(jobs)

    def run(self) -> None:
        while self.has_work():
            if not self.step() and not self.scheduler.running and self.scheduler.waiting:
                raise RuntimeError("no request could be scheduled: the KV pools are too small")

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Req]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        self.run()
        return reqs

    # -- text ----------------------------------------------------------------------------------
    def decode_ids(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer")
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def text(self, req: Req) -> str:
        return output_text(req, self.decode_ids)
