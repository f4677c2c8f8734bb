"""Decode worker over gRPC, fed by a real prefill worker: disaggregated output == one engine's.

Also: reservations and their expiry, received KV waiting for Decode (and expiring), Decode with no
KV, a client cancelling its stream, a first token that already ends the request.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.common.prompt_wire import pack_ids
from services.common.sampling_params import SamplingParams
from services.models.model_store import resolve_model
from services.proto_gen import worker_pb2
from tests.worker_harness import (
    LoadedModel,
    decode_stub,
    prefill_stub,
    run_request,
    sampling,
    serve_decode,
    serve_prefill,
    shipped_kv_bytes,
)

MAX_TOKENS = 8


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


_LOADED: dict[str, LoadedModel] = {}


def load(name: str) -> LoadedModel:
    if name not in _LOADED:
        _LOADED[name] = LoadedModel.load(name, resolve_model(name))
    return _LOADED[name]


@pytest.fixture(scope="module", params=["mimo-tiny", "smollm2"])
def lm(request):
    return load(request.param)


@pytest.fixture(scope="module")
def mimo():
    return load("mimo-tiny")


@pytest.fixture(scope="module")
def pair(lm):
    # prefill in chunks of 48 tokens: the long prompts cross window edges inside the prefill worker
    pre = serve_prefill(lm, engine={"chunk_size": 48})
    dec = serve_decode(lm)
    yield pre, dec
    pre.stop()
    dec.stop()


def prompts(lm) -> dict[str, list[int]]:
    if lm.name == "smollm2":
        text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
        short = lm.tokenizer.encode("The capital of France is", add_special_tokens=False).ids
        long = lm.tokenizer.encode(" ".join([text] * 16), add_special_tokens=False).ids
    else:
        short = [(31 * i + 7) % 150_000 for i in range(20)]
        long = [(977 * i + 13) % 150_000 for i in range(300)]  # > 2 windows of 128
    assert len(long) > 2 * 128
    return {"short": short, "long": long}


@pytest.mark.parametrize("which", ["short", "long"])
def test_prefill_here_decode_there_equals_one_engine(lm, pair, which):
    pre, dec = pair
    prompt = prompts(lm)[which]
    (ref,) = lm.engine(page_size=16).generate(
        [prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    out = run_request(pre, dec, f"{lm.name}-{which}", prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert out.tokens == ref.output_ids
    assert out.chunks[-1].finish_reason == "length" and out.chunks[-1].completion_tokens == MAX_TOKENS
    assert all(not c.finish_reason for c in out.chunks[:-1])
    assert [lp for c in out.chunks for lp in c.logprobs] == pytest.approx(ref.output_logprobs[1:], abs=1e-4)
    # SWA layers ship only the window: the bytes follow the geometry, not the prompt length alone
    window = pre.loop.engine.window
    per_token = {"full": 0, "swa": 0}
    for g in lm.model.config.kv_specs:
        per_token["full" if g.window is None else "swa"] += g.kv_heads * (g.k_dim + g.v_dim) * 4
    assert out.kv_bytes == len(prompt) * per_token["full"] + min(len(prompt), window) * per_token["swa"]
    assert dec.worker.reserved_tokens() == 0 and dec.worker.pending_count() == 0
    assert wait_for(lambda: dec.loop.stats.running == 0)


def test_a_first_token_that_ends_the_request_needs_no_kv(lm, pair):
    pre, dec = pair
    prompt = prompts(lm)["short"]
    out = run_request(pre, dec, f"{lm.name}-one", prompt, max_tokens=1)
    assert out.reply.finish_reason == "length" and out.kv_bytes == 0
    # a router that calls Decode anyway gets the finish at once, not a wait for KV
    chunks = list(
        decode_stub(dec).Decode(
            worker_pb2.DecodeRequest(
                rid=f"{lm.name}-one", sampling=sampling(max_tokens=1), prompt_ids_packed=pack_ids(prompt),
                first_token=out.reply.first_token,
            ),
            timeout=10,
        )
    )  # fmt: skip
    assert [(list(c.token_ids), c.finish_reason, c.completion_tokens) for c in chunks] == [([], "length", 1)]
    assert dec.worker.reserved_tokens() == 0


def test_a_stop_token_during_decode_ends_the_stream(lm, pair):
    pre, dec = pair
    prompt = prompts(lm)["short"]
    (ref,) = lm.engine().generate(
        [prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    ids = ref.output_ids
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i]) + 1  # a token first seen in decode
    stop_at = ids[cut - 1]
    out = run_request(pre, dec, f"{lm.name}-stoptok", prompt, max_tokens=MAX_TOKENS, ignore_eos=True,
                      stop_token_ids=[stop_at])  # fmt: skip
    assert out.tokens == ids[:cut]
    assert out.chunks[-1].finish_reason == "stop" and out.chunks[-1].completion_tokens == cut


def test_reservations_count_against_free_kv_and_expire(mimo):
    dec = serve_decode(mimo, engine={"max_total_tokens": 1024}, reserve_ttl=0.4)
    try:
        stub = decode_stub(dec)
        assert stub.Reserve(worker_pb2.ReserveRequest(rid="a", prompt_len=500, max_tokens=100)).ok
        second = stub.Reserve(worker_pb2.ReserveRequest(rid="b", prompt_len=500, max_tokens=100))
        assert not second.ok and "available" in second.reason
        too_big = stub.Reserve(worker_pb2.ReserveRequest(rid="c", prompt_len=2000, max_tokens=1))
        assert not too_big.ok and "in all" in too_big.reason
        with pytest.raises(grpc.RpcError) as e:
            stub.Reserve(worker_pb2.ReserveRequest(rid="d", prompt_len=0, max_tokens=1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dec.worker.reserved_tokens() == 600
        assert wait_for(lambda: dec.worker.reserved_tokens() == 0, timeout=3)  # "a" expired
        assert stub.Reserve(worker_pb2.ReserveRequest(rid="b", prompt_len=500, max_tokens=100)).ok
        health = stub.Health(worker_pb2.HealthRequest())
        assert (health.role, health.model, health.ready) == ("decode", mimo.name, True)
        assert health.free_kv_tokens == 1024 - 600
    finally:
        dec.stop()


def test_kv_without_decode_expires_and_decode_without_kv_fails(mimo):
    pre = serve_prefill(mimo)
    dec = serve_decode(mimo, pending_ttl=0.5, kv_wait=0.3)
    try:
        prompt = prompts(mimo)["short"]
        assert (
            decode_stub(dec).Reserve(worker_pb2.ReserveRequest(rid="orphan", prompt_len=20, max_tokens=8)).ok
        )
        reply = prefill_stub(pre).Prefill(
            worker_pb2.PrefillRequest(rid="orphan", prompt_ids_packed=pack_ids(prompt), sampling=sampling(max_tokens=8),
                                      decode_addr=dec.addr),
            timeout=30,
        )  # fmt: skip
        assert shipped_kv_bytes(pre) > 0
        assert dec.worker.pending_count() == 1 and dec.worker.reserved_tokens() == 28
        assert wait_for(
            lambda: dec.worker.pending_count() == 0 and dec.worker.reserved_tokens() == 0, timeout=3
        )
        with pytest.raises(grpc.RpcError) as e:
            list(decode_stub(dec).Decode(
                worker_pb2.DecodeRequest(rid="orphan", sampling=sampling(max_tokens=8), prompt_ids_packed=pack_ids(prompt),
                                         first_token=reply.first_token),
                timeout=10,
            ))  # fmt: skip
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no KV arrived" in e.value.details()
        assert dec.loop.engine.full_pool.num_used == 0
    finally:
        pre.stop()
        dec.stop()


def test_a_client_cancel_aborts_the_request_in_the_engine(mimo):
    pre = serve_prefill(mimo)
    dec = serve_decode(mimo)
    try:
        prompt = prompts(mimo)["short"]
        sp = sampling(max_tokens=3000, ignore_eos=True)
        assert (
            decode_stub(dec).Reserve(worker_pb2.ReserveRequest(rid="bye", prompt_len=20, max_tokens=3000)).ok
        )
        reply = prefill_stub(pre).Prefill(
            worker_pb2.PrefillRequest(
                rid="bye", prompt_ids_packed=pack_ids(prompt), sampling=sp, decode_addr=dec.addr
            ),
            timeout=30,
        )
        stream = decode_stub(dec).Decode(
            worker_pb2.DecodeRequest(
                rid="bye", sampling=sp, prompt_ids_packed=pack_ids(prompt), first_token=reply.first_token
            )
        )
        first = next(stream)
        assert first.token_ids and not first.finish_reason
        assert dec.loop.stats.running == 1
        stream.cancel()
        assert wait_for(lambda: dec.loop.stats.running == 0 and dec.loop.stats.steps > 0, timeout=5)
        engine = dec.loop.engine
        assert wait_for(
            lambda: (
                engine.full_pool.num_free + engine.cache.evictable_full_pages() == engine.full_pool.num_pages
            )
        )
        assert dec.worker.metrics.requests.labels("cancelled")._value.get() == 1
    finally:
        pre.stop()
        dec.stop()


def test_decode_refuses_kv_of_another_model(mimo):
    other = load("smollm2")
    pre = serve_prefill(mimo)
    dec = serve_decode(other)
    try:
        with pytest.raises(grpc.RpcError) as e:
            prefill_stub(pre).Prefill(
                worker_pb2.PrefillRequest(rid="x", prompt_ids_packed=pack_ids([1, 2, 3]), sampling=sampling(max_tokens=4),
                                          decode_addr=dec.addr),
                timeout=30,
            )  # fmt: skip
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "geometry" in e.value.details()
        assert dec.worker.pending_count() == 0
    finally:
        pre.stop()
        dec.stop()


def test_concurrent_requests_share_the_decode_batch(lm, pair):
    pre, dec = pair
    base = prompts(lm)["short"]
    variants = [base[:-1] + [base[-1] + k] for k in range(1, 4)]
    refs = lm.engine().generate(
        variants, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        got[i] = run_request(
            pre, dec, f"{lm.name}-c{i}", variants[i], max_tokens=MAX_TOKENS, ignore_eos=True
        ).tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(variants))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(variants))] == [r.output_ids for r in refs]


def test_a_stop_string_ends_the_stream_where_the_engine_sees_it():
    lm = load("smollm2")
    pre, dec = serve_prefill(lm), serve_decode(lm)
    try:
        prompt = prompts(lm)["short"]  # greedy: " Paris.\n\nThe answer is:"
        out = run_request(pre, dec, "stopstr", prompt, max_tokens=MAX_TOKENS, stop=["answer"])
        text = lm.tokenizer.decode(out.tokens)
        assert text.endswith("answer") and "Paris" in text
        last = out.chunks[-1]
        assert (last.finish_reason, last.matched_stop, last.completion_tokens) == (
            "stop",
            "answer",
            len(out.tokens),
        )
    finally:
        pre.stop()
        dec.stop()


class _HeldSender:
    """The real gRPC KV sender, held at the door until the test lets it go."""

    def __init__(self) -> None:
        from services.common.kv_transport import make_sender

        self.inner = make_sender("grpc")
        self.entered = threading.Event()
        self.go = threading.Event()

    def send(self, addr, payload):
        self.entered.set()
        assert self.go.wait(30)
        return self.inner.send(addr, payload)


def test_kv_that_lands_after_an_abort_is_dropped_at_once_not_after_the_ttl(mimo):
    held = _HeldSender()
    pre = serve_prefill(mimo, sender_factory=lambda transport: held)
    dec = serve_decode(mimo, pending_ttl=60.0, reserve_ttl=60.0)
    errors: list[grpc.RpcError] = []
    try:
        prompt = prompts(mimo)["short"]
        assert decode_stub(dec).Reserve(worker_pb2.ReserveRequest(rid="late", prompt_len=20, max_tokens=8)).ok

        def run() -> None:
            try:
                prefill_stub(pre).Prefill(
                    worker_pb2.PrefillRequest(rid="late", prompt_ids_packed=pack_ids(prompt), sampling=sampling(max_tokens=8),
                                              decode_addr=dec.addr),
                    timeout=30,
                )  # fmt: skip
            except grpc.RpcError as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        assert held.entered.wait(30)  # computed, the KV about to leave
        assert prefill_stub(pre).Abort(worker_pb2.AbortRequest(rid="late")).found
        held.go.set()  # the bytes land anyway
        t.join(30)
        assert [e.code() for e in errors] == [grpc.StatusCode.CANCELLED]
        # the prefill worker told the decode worker: KV and reservation freed in seconds, not 60 s
        assert wait_for(
            lambda: dec.worker.pending_count() == 0 and dec.worker.reserved_tokens() == 0, timeout=5
        )
        assert dec.loop.engine.full_pool.num_used == 0
    finally:
        held.go.set()
        pre.stop()
        dec.stop()
