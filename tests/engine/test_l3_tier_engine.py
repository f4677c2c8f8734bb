"""L3 in the engine, against real GCache node processes and a real redis-server: what one worker
wrote down, another worker (its own L1 and L2, nothing shared but GCache) restores; every output
and first-token logit equals a plain re-computation without caches (1e-4)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from services.common.redis_server import RedisServer
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.engine.tensors.kv_bytes import page_nbytes, read_pages, write_pages
from services.engine.tensors.kv_store import KVStore
from services.gcache.client import GCacheClient
from services.worker.loop_metrics import L3Collector
from tests.engine.tiny_models import mimo_dict, random_model, reference_greedy, reference_logits
from tests.gcache.conftest import NodeProc

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
PAGE = 4


@pytest.fixture(scope="module")
def mimo():
    return random_model(mimo_dict(window=8), seed=11)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, list[NodeProc]]]:
    with RedisServer() as redis:
        nodes = [NodeProc(redis.url, tmp_path / f"n{i}") for i in range(2)]
        try:
            yield redis, nodes
        finally:
            for n in nodes:
                n.kill()


def _client(redis: RedisServer, nodes: int = 2) -> GCacheClient:
    c = GCacheClient(redis.url, shm=False, refresh_interval=0.2, timeout=3.0, down_seconds=0.5)
    assert c.wait_for_nodes(nodes)
    return c


def _engine(model, client: GCacheClient | None, name: str = "mimo-test", **kw) -> tuple[Engine, dict]:
    cfg = {"page_size": PAGE, "chunk_size": 16, "max_total_tokens": 160, "max_running": 4,
           "host_kv_tokens": 256} | kw  # fmt: skip
    eng = Engine(model, model.config, EngineConfig(**cfg))
    if client is not None:
        eng.attach_l3(client, name)
    first: dict[str, torch.Tensor] = {}
    eng.logits_hook = lambda req, lg: first.setdefault(req.rid, lg.clone())
    return eng, first


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def _check(model, first, req, prompt) -> None:
    assert req.output_ids == reference_greedy(model, prompt, GREEDY.max_tokens), req.rid
    assert _close(first[req.rid], reference_logits(model, prompt)[-1]), req.rid


def test_kv_bytes_round_trip_between_a_device_store_and_a_host_layout(mimo):
    specs = list(mimo.config.kv_specs)
    torch.manual_seed(0)
    dev = KVStore(specs, 12, 10, PAGE)
    for t in dev.k + dev.v:
        t.normal_()
    other = KVStore(specs, 12, 10, PAGE)
    for kind, src, dst in (("full", [3, 7, 1], [0, 11, 5]), ("swa", [2, 9], [8, 4])):
        rows = read_pages(dev.k, dev.v, specs, kind, PAGE, src)
        assert rows.shape == (len(src), page_nbytes(specs, kind, PAGE, torch.float32))
        write_pages(other.k, other.v, specs, kind, PAGE, dst, memoryview(rows.numpy()).cast("B"))
        for i, spec in enumerate(specs):
            if spec.kind != kind:
                continue
            for a, b in ((dev.k[i], other.k[i]), (dev.v[i], other.v[i])):
                pa, pb = a.view(-1, PAGE, *a.shape[1:]), b.view(-1, PAGE, *b.shape[1:])
                for s, d in zip(src, dst, strict=True):
                    assert torch.equal(pa[s], pb[d])
    with pytest.raises(ValueError, match="the layers need"):
        write_pages(other.k, other.v, specs, "full", PAGE, [0], bytes(8 * 3))


def test_another_worker_restores_from_l3_with_the_same_output(mimo, cluster):
    redis, _ = cluster
    rng = random.Random(1)
    convs = [[rng.randrange(250) for _ in range(30 + 7 * i)] for i in range(3)]
    with _client(redis) as ca, _client(redis) as cb:
        writer, wfirst = _engine(mimo, ca)
        for conv in convs:
            (req,) = writer.generate([list(conv)], GREEDY)
            _check(mimo, wfirst, req, conv)
            conv += req.output_ids
        assert writer.l3 is not None
        writer.l3.flush(10)
        assert writer.l3.counters.writes > 0 and writer.l3.counters.write_errors == 0
        reader, rfirst = _engine(mimo, cb)
        for i, conv in enumerate(convs):
            nxt = conv + [rng.randrange(250) for _ in range(3 + i)]  # the next user message
            (req,) = reader.generate([nxt], GREEDY)
            _check(mimo, rfirst, req, nxt)
            # the reader never saw this conversation: everything cached came from L3, via L2
            assert req.cached_l3 > 0 and req.cached_l3 == req.cached_len, (req.cached_l3, req.cached_len)
            assert req.cached_l2 == 0
        assert reader.l3 is not None and reader.l3.counters.fetch_hits == len(convs)
        registry = CollectorRegistry()  # what a worker's /metrics shows of it
        registry.register(L3Collector("prefill", reader.l3.counters_dict))
        text = generate_latest(registry).decode()
        assert f"swaserve_prefill_l3_lookup_hits_total {float(len(convs))}" in text
        assert f"swaserve_prefill_l3_lookup_bytes_total {float(reader.l3.counters.fetch_bytes)}" in text
        # a second request with the same prefix on the reader is now an L1 (or L2) hit, not L3
        again = convs[0] + [5, 6]
        (req,) = reader.generate([again], GREEDY)
        _check(mimo, rfirst, req, again)
        assert req.cached_len > 0 and req.cached_l3 == 0


def test_the_namespace_keeps_other_weights_and_dtypes_apart(mimo, cluster):
    redis, _ = cluster
    rng = random.Random(2)
    prompt = [rng.randrange(250) for _ in range(37)]
    with _client(redis) as c:
        writer, _ = _engine(mimo, c, name="weights-a")
        (req,) = writer.generate([prompt], GREEDY)
        assert writer.l3 is not None
        writer.l3.flush(10)
        nxt = prompt + req.output_ids + [9, 9]
        for name, dtype in (("weights-b", "float32"), ("weights-a", "bfloat16")):
            other, _ = _engine(mimo, c, name=name, dtype=dtype)
            (r,) = other.generate([nxt], GREEDY)
            assert r.cached_l3 == 0, (name, dtype)
        same, first = _engine(mimo, c, name="weights-a")
        (r,) = same.generate([nxt], GREEDY)
        assert r.cached_l3 > 0
        _check(mimo, first, r, nxt)


def test_a_dead_cluster_costs_no_request(mimo, cluster):
    """Every node killed -9 after the writes: the lookup is a miss, the request is computed."""
    redis, nodes = cluster
    rng = random.Random(4)
    prompt = [rng.randrange(250) for _ in range(40)]
    with _client(redis) as ca, _client(redis) as cb:
        writer, _ = _engine(mimo, ca)
        (req,) = writer.generate([prompt], GREEDY)
        assert writer.l3 is not None
        writer.l3.flush(10)
        for n in nodes:
            n.kill()
        reader, first = _engine(mimo, cb)
        nxt = prompt + req.output_ids + [3]
        (r,) = reader.generate([nxt], GREEDY)
        _check(mimo, first, r, nxt)
        assert r.cached_len == 0 and r.cached_l3 == 0
        # write-down to a dead cluster: dropped and counted, the engine goes on
        (r2,) = reader.generate([[rng.randrange(250) for _ in range(30)]], GREEDY)
        assert r2.finished
        assert reader.l3 is not None
        reader.l3.flush(20)
        assert reader.l3.counters.write_errors > 0


def test_a_missing_tail_in_l3_restores_only_up_to_an_earlier_tail(mimo, cluster):
    """Window-safe in L3: full blocks without the tail at their end are not a restore point."""
    redis, _ = cluster
    rng = random.Random(6)
    short = [rng.randrange(250) for _ in range(21)]
    with _client(redis) as ca, _client(redis) as cb:
        writer, _ = _engine(mimo, ca)
        (a,) = writer.generate([list(short)], GREEDY)
        longer = short + a.output_ids + [rng.randrange(250) for _ in range(19)]
        (b,) = writer.generate([list(longer)], GREEDY)
        assert writer.l3 is not None
        writer.l3.flush(10)
        # delete the tail at the longer prompt's end (and at its finished end) from L3
        n_long = len(longer) // PAGE
        hashes = writer.scheduler.page_hashes(b, (len(longer) + len(b.output_ids)) // PAGE * PAGE)
        dropped = ca.delete([writer.l3.key_tail(h) for h in hashes[n_long - 1 :]])
        assert dropped >= 1
        reader, first = _engine(mimo, cb)
        nxt = longer + b.output_ids + [1, 2, 3]
        (r,) = reader.generate([nxt], GREEDY)
        _check(mimo, first, r, nxt)
        # restored only to the earlier prompt's end (its tail is there), not to the longer one's
        assert 0 < r.cached_l3 <= len(short) + len(a.output_ids)
        assert r.cached_len < len(longer)


def test_worker_flags_for_l3_fail_clearly_without_l2_or_with_bad_values(mimo):
    import argparse

    from services.worker.serve import attach_l3

    no_l2, _ = _engine(mimo, None, host_kv_tokens=0)
    args = argparse.Namespace(gcache_redis_url="redis://127.0.0.1:1/0", l3_model_name="", model="m",
                              l3_lookup_timeout=2.0, l3_max_inflight_mb=256)  # fmt: skip
    with pytest.raises(SystemExit, match="needs --host-kv-tokens"):
        attach_l3(no_l2, args)
    with_l2, _ = _engine(mimo, None)
    for bad in ({"l3_lookup_timeout": 0.0}, {"l3_max_inflight_mb": 0}):
        with pytest.raises(SystemExit, match="must be > 0"):
            attach_l3(with_l2, argparse.Namespace(**(vars(args) | bad)))
    assert attach_l3(with_l2, argparse.Namespace(**(vars(args) | {"gcache_redis_url": ""}))) is None
