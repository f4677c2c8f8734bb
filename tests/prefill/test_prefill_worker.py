"""Prefill worker over gRPC, shipping KV over the real transport to a capturing receiver.

What it ships must be exactly what one engine computes; the first token follows the client's
sampling params; a first token that ends the request ships nothing; failures map to status codes.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import replace

import grpc
import pytest
import torch

from services.common.grpc_server import make_server
from services.common.kv_payload import KVPayload
from services.common.kv_transport import add_kv_receiver
from services.common.netutil import free_port
from services.common.prompt_wire import pack_ids
from services.common.sampling_params import SamplingParams
from services.models.model_store import resolve_model
from services.prefill.main import build_parser
from services.proto_gen import worker_pb2
from services.worker.loop_metrics import serve_metrics
from tests.worker_harness import LoadedModel, prefill_stub, sampling, serve_prefill, shipped_kv_bytes

SHORT = [(31 * i + 7) % 150_000 for i in range(20)]
LONG = [(977 * i + 13) % 150_000 for i in range(300)]  # > 2 windows of 128


@pytest.fixture(scope="module")
def lm():
    return LoadedModel.load("mimo-tiny", resolve_model("mimo-tiny"))


class Capture:
    """A stand-in decode worker: the real KV receiver, payloads kept in a list (or refused)."""

    def __init__(self) -> None:
        self.payloads: list[KVPayload] = []
        self.server, port = make_server("127.0.0.1", 0)
        self.receiver = add_kv_receiver(self.server, self.payloads.append)
        self.server.start()
        self.addr = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(grace=None)
        self.receiver.close()


@pytest.fixture(scope="module")
def served(lm):
    pre = serve_prefill(lm, engine={"chunk_size": 64})
    cap = Capture()
    yield pre, cap
    pre.stop()
    cap.stop()


def prefill(pre, cap, rid, prompt, **params):
    return prefill_stub(pre).Prefill(
        worker_pb2.PrefillRequest(
            rid=rid, prompt_ids_packed=pack_ids(prompt), sampling=sampling(**params), decode_addr=cap.addr
        ),
        timeout=60,
    )


def sample(pre, name: str) -> float:
    """A `swaserve_prefill_<name>` sample of the worker's metrics (bucket "all")."""
    return pre.worker.metrics.registry.get_sample_value(f"swaserve_prefill_{name}", {"bucket": "all"}) or 0.0


def reference(lm, prompt, params: SamplingParams):
    engine = lm.engine(page_size=16)
    exported: list[KVPayload] = []
    engine.finish_hook = lambda req: exported.append(engine.export_kv(req))
    (req,) = engine.generate([prompt], params)
    return req, exported[0]


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_first_token_and_shipped_kv_are_one_engines(lm, served, prompt):
    pre, cap = served
    cap.payloads.clear()
    ref, ref_kv = reference(lm, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    before = {name: sample(pre, name) for name in ("compute_seconds_sum", "queue_seconds_count")}
    shipped = shipped_kv_bytes(pre)
    reply = prefill(pre, cap, f"kv-{len(prompt)}", prompt, max_tokens=16)
    assert (reply.first_token, reply.finish_reason, reply.cached_tokens) == (ref.output_ids[0], "", 0)
    assert reply.first_logprob == pytest.approx(ref.output_logprobs[0], abs=1e-4)
    (got,) = cap.payloads
    assert (
        got.meta == replace(ref_kv.meta, rid=f"kv-{len(prompt)}")
        and shipped_kv_bytes(pre) - shipped == got.nbytes == got.meta.nbytes
    )
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(got.k + got.v, ref_kv.k + ref_kv.v, strict=True)
    )
    assert sample(pre, "compute_seconds_sum") > before["compute_seconds_sum"]  # the worker's own timings
    assert sample(pre, "queue_seconds_count") == before["queue_seconds_count"] + 1


def test_a_shared_prefix_comes_from_the_cache_and_ships_the_same_kv(lm, served):
    pre, cap = served
    prefill(pre, cap, "warm", LONG, max_tokens=4)
    cap.payloads.clear()
    variant = LONG[:-1] + [LONG[-1] + 1]
    reply = prefill(pre, cap, "hit", variant, max_tokens=4)
    assert reply.cached_tokens > 0 and reply.cached_tokens % 16 == 0 and reply.cached_tokens < len(variant)
    _, ref_kv = reference(lm, variant, SamplingParams(max_tokens=1, temperature=0.0))
    (got,) = cap.payloads
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(got.k + got.v, ref_kv.k + ref_kv.v, strict=True)
    )
    m = pre.worker.metrics.prompt_tokens
    assert m.labels("l1")._value.get() >= reply.cached_tokens


def test_a_packed_prompt_is_the_same_prompt(served):
    pre, cap = served
    cap.payloads.clear()
    sp = sampling(max_tokens=4)
    plain = prefill(pre, cap, "plain", LONG, max_tokens=4)
    req = worker_pb2.PrefillRequest(
        rid="packed", prompt_ids_packed=pack_ids(LONG), sampling=sp, decode_addr=cap.addr
    )
    packed = prefill_stub(pre).Prefill(req, timeout=60)
    assert (packed.first_token, packed.first_logprob) == (plain.first_token, plain.first_logprob)
    assert packed.cached_tokens > 0  # the same tokens: the first request's pages are a hit
    a, b = cap.payloads
    assert a.meta.num_tokens == b.meta.num_tokens == len(LONG)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))


def test_the_first_token_follows_the_clients_sampling_params(lm, served):
    pre, cap = served
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234}
    (ref,) = lm.engine().generate([SHORT], SamplingParams(max_tokens=5, **params))
    reply = prefill(pre, cap, "seeded", SHORT, max_tokens=5, **params)
    assert reply.first_token == ref.output_ids[0]


def test_a_first_token_that_ends_the_request_ships_nothing(lm, served):
    pre, cap = served
    first = prefill(pre, cap, "probe", SHORT, max_tokens=1).first_token
    first_text = lm.tokenizer.decode([first])
    cases = [
        ({"max_tokens": 1}, "length"),
        ({"max_tokens": 8, "stop_token_ids": [first]}, "stop"),
        ({"max_tokens": 8, "stop": [first_text]}, "stop"),
    ]
    assert first_text, "the first token must decode to some text for the stop-string case"
    cap.payloads.clear()
    for i, (params, reason) in enumerate(cases):
        shipped = shipped_kv_bytes(pre)
        reply = prefill(pre, cap, f"ends-{i}", SHORT, **params)
        assert (reply.first_token, reply.finish_reason, shipped_kv_bytes(pre) - shipped) == (first, reason, 0)
    assert cap.payloads == []


@pytest.mark.parametrize(
    "change, match",
    [
        ({"decode_addr": ""}, "decode_addr"),
        ({"prompt_ids_packed": pack_ids([10**9])}, "token ids"),
        ({"prompt_ids_packed": b""}, "at least one token"),
        ({"prompt_ids_packed": b"\x01" * 5}, "4-byte ids"),
        ({"sampling": sampling(max_tokens=0)}, "max_tokens"),
        ({"sampling": sampling(max_tokens=4, top_p=1.5)}, "top_p"),
        ({"kv_transport": "pigeon"}, "pigeon"),
    ],
)
def test_bad_requests_are_invalid_argument(served, change, match):
    pre, cap = served
    fields = {"rid": "bad", "prompt_ids_packed": pack_ids(SHORT), "sampling": sampling(max_tokens=4), "decode_addr": cap.addr}
    with pytest.raises(grpc.RpcError) as e:
        prefill_stub(pre).Prefill(worker_pb2.PrefillRequest(**(fields | change)), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details()


def test_an_unreachable_decode_worker_is_unavailable_and_leaks_nothing(served):
    pre, _ = served
    req = worker_pb2.PrefillRequest(
        rid="lost", prompt_ids_packed=pack_ids(SHORT), sampling=sampling(max_tokens=4),
        decode_addr=f"127.0.0.1:{free_port()}",
    )
    with pytest.raises(grpc.RpcError) as e:
        prefill_stub(pre).Prefill(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "lost" in e.value.details()
    engine = pre.loop.engine
    assert engine.full_pool.num_free + engine.cache.evictable_full_pages() == engine.full_pool.num_pages
    assert pre.worker.metrics.requests.labels("kv_transfer_failed")._value.get() == 1


def test_abort_stops_a_running_prefill(lm):
    pre = serve_prefill(lm, engine={"chunk_size": 16, "max_batch_tokens": 16})  # ~190 steps
    cap = Capture()
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            prefill(pre, cap, "long-one", (LONG * 10)[:3000], max_tokens=4)
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    try:
        t.start()
        deadline = time.monotonic() + 10
        while prefill_stub(pre).Health(worker_pb2.HealthRequest()).running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert prefill_stub(pre).Abort(worker_pb2.AbortRequest(rid="long-one")).found
        t.join(10)
        assert [e.code() for e in errors] == [grpc.StatusCode.CANCELLED] and cap.payloads == []
        assert not prefill_stub(pre).Abort(worker_pb2.AbortRequest(rid="long-one")).found
    finally:
        pre.stop()
        cap.stop()


def test_health_and_metrics_over_http(served):
    pre, cap = served
    prefill(pre, cap, "metered", SHORT[:-1], max_tokens=4)
    health = prefill_stub(pre).Health(worker_pb2.HealthRequest())
    assert (health.role, health.model, health.ready, health.running) == ("prefill", "mimo-tiny", True, 0)
    assert health.free_kv_tokens > 0
    port = serve_metrics(pre.worker.metrics.registry, 0, "127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"
    }
    shipped = values['swaserve_prefill_kv_bytes_total{transport="grpc"}']
    assert shipped > 0
    assert values['swaserve_prefill_kv_transfer_seconds_count{transport="grpc"}'] >= 1
    for name in ('swaserve_prefill_ttft_seconds_count{bucket="all"}', 'swaserve_prefill_queue_seconds_count{bucket="all"}',
                 'swaserve_prefill_prompt_tokens_total{source="computed"}', "swaserve_prefill_running_requests",
                 "swaserve_prefill_waiting_requests", "swaserve_prefill_free_kv_tokens"):  # fmt: skip
        assert name in values
    assert values['swaserve_prefill_ttft_seconds_bucket{bucket="all",le="512.0"}'] >= 1
    assert values['swaserve_prefill_prompt_tokens_total{source="l3"}'] == 0  # created at start, 0 not absent
    pool = {k: v for k, v in values.items() if k.startswith("swaserve_prefill_kv_pool_")}
    for kind in ("full", "swa"):
        cap = pool[f'swaserve_prefill_kv_pool_capacity_pages{{pool="{kind}"}}']
        assert 0 < pool[f'swaserve_prefill_kv_pool_used_pages{{pool="{kind}"}}'] <= cap  # the prompt stays cached


def test_main_defaults_to_uncached_first_and_grpc():
    args = build_parser().parse_args(["--port", "0"])
    assert (args.queue_policy, args.kv_transport, args.model) == ("uncached-first", "grpc", "smollm2")


def test_a_prefix_evicted_from_the_device_comes_back_from_host_memory(lm):
    """L2 behind the prefix cache: the reply says which cached tokens the host tier gave, the
    metrics count them, and the first token equals a plain engine's."""
    pre = serve_prefill(lm, engine={"max_total_tokens": 512, "host_kv_tokens": 8192})
    cap = Capture()
    try:
        conv = LONG[:200]
        first = prefill(pre, cap, "turn-1", conv, max_tokens=4)
        for i in range(4):  # other traffic pushes turn 1 out of the 512-token device pool
            prefill(
                pre, cap, f"other-{i}", [(53 * j + 11 * i + 5) % 150_000 for j in range(300)], max_tokens=4
            )
        again = conv + [17, 18, 19]
        reply = prefill(pre, cap, "turn-2", again, max_tokens=4)
        assert reply.cached_tokens_l2 > 0 and reply.cached_tokens >= reply.cached_tokens_l2
        assert reply.cached_tokens >= 192 - 16  # the window-safe, page-aligned prefix of turn 1
        ref_req, _ = reference(lm, again, SamplingParams(max_tokens=4, temperature=0.0))
        assert reply.first_token == ref_req.output_ids[0] and first.cached_tokens == 0
        m = pre.worker.metrics.prompt_tokens
        assert m.labels("l2")._value.get() == reply.cached_tokens_l2
    finally:
        pre.stop()
        cap.stop()
