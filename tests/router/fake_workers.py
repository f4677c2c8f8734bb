"""FAKE prefill / decode workers: real gRPC servers speaking proto/worker.proto around a toy model.

They exist to test the router while the real workers are written; nothing here computes KV.

Toy model: the reply to a prompt is a script chosen by a keyword in the prompt text (see REPLIES),
tokenized with the real tokenizer and followed by eos. Greedy (temperature 0) always gives the
script; sampling appends " #<seed>" (seed: the request's, else a hash of the rid) so that different
seeds give different, known texts.
Logprob of the k-th generated token (0-based) is -(k + 1) / 10.

The fakes check the protocol order (Reserve, then Prefill with the decode address, then Decode of a
sequence whose "KV" landed) and record every request and Abort, so tests can look at what the
router sent. Knobs inject failures: a refused Reserve, a failing Prefill, a decode worker that dies
after some chunks, slow chunks.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from tokenizers import Tokenizer

from services.common.prompt_wire import prompt_ids_of
from services.proto_gen import worker_pb2, worker_pb2_grpc

REPLIES: dict[str, str] = {
    "unicode": "Snowman ☃, 你好世界, emoji 🎉🙂 and café.",
    "stops": "one, two, three. STOP here; and then more text after it.",
    "long": " ".join(f"word{i}" for i in range(60)) + ".",
}
DEFAULT_REPLY = "Hello! I am a fake model. The answer is 42."
FILLER = " more"  # generated after the script when eos is ignored

# "KV" that fake prefill workers shipped, by decode address: {decode_addr: {rid: prompt_ids}}
_LANDED: dict[str, dict[str, list[int]]] = {}
_LANDED_LOCK = threading.Lock()


def logprob_at(k: int) -> float:
    return -(k + 1) / 10


@dataclass
class ToyModel:
    tok: Tokenizer
    eos_id: int

    def reply_text(self, prompt_ids: list[int], sampling: worker_pb2.SamplingParams, rid: str) -> str:
        text = self.tok.decode(list(prompt_ids), skip_special_tokens=False)
        reply = next((r for key, r in REPLIES.items() if f"[{key}]" in text), DEFAULT_REPLY)
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.HasField("seed") else zlib.crc32(rid.encode())
            reply += f" #{seed}"
        return reply

    def generate(
        self, prompt_ids: list[int], sampling: worker_pb2.SamplingParams, rid: str
    ) -> tuple[list[int], str, str]:
        """All generated tokens (the first included), the finish reason, the matched stop string."""
        script = self.tok.encode(self.reply_text(prompt_ids, sampling, rid), add_special_tokens=False).ids
        script = [*script, self.eos_id]
        filler = self.tok.encode(FILLER, add_special_tokens=False).ids
        out: list[int] = []
        while True:
            k = len(out)
            tok = script[k] if k < len(script) else filler[(k - len(script)) % len(filler)]
            out.append(tok)
            if tok == self.eos_id and not sampling.ignore_eos:
                return out, "stop", ""
            if tok in sampling.stop_token_ids:
                return out, "stop", ""
            if sampling.stop:
                text = self.tok.decode(out, skip_special_tokens=True)
                hit = next((s for s in sampling.stop if s in text), None)
                if hit is not None:
                    return out, "stop", hit
            if len(out) >= sampling.max_tokens:
                return out, "length", ""


@dataclass
class _Server:
    server: grpc.Server
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


def _serve(add: object, servicer: object) -> _Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    add(servicer, server)  # type: ignore[operator]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return _Server(server, port)


@dataclass
class FakeDecodeWorker(worker_pb2_grpc.DecodeWorkerServicer):
    model: ToyModel
    chunk_size: int = 2  # tokens per DecodeChunk
    chunk_delay_s: float = 0.0
    reserve_ok: bool = True
    reserve_reason: str = "fake decode worker is full"
    die_after_chunks: int | None = None  # abort the stream with UNAVAILABLE after this many chunks
    honour_stop: bool = True  # False: ignore stop strings (the router must cut and Abort)
    reserved: dict[str, worker_pb2.ReserveRequest] = field(default_factory=dict)
    decode_requests: list[worker_pb2.DecodeRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    _srv: _Server | None = None

    def start(self) -> FakeDecodeWorker:
        self._srv = _serve(worker_pb2_grpc.add_DecodeWorkerServicer_to_server, self)
        with _LANDED_LOCK:
            _LANDED[self.addr] = {}
        return self

    @property
    def addr(self) -> str:
        assert self._srv is not None
        return self._srv.addr

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.server.stop(0)

    def reset(self) -> None:
        self.chunk_size, self.chunk_delay_s, self.reserve_ok, self.die_after_chunks = 2, 0.0, True, None
        self.honour_stop = True

    def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ReserveReply:
        if not self.reserve_ok:
            return worker_pb2.ReserveReply(ok=False, reason=self.reserve_reason)
        self.reserved[request.rid] = request
        return worker_pb2.ReserveReply(ok=True)

    def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.DecodeChunk]:
        self.decode_requests.append(request)
        with _LANDED_LOCK:
            landed = _LANDED[self.addr].pop(request.rid, None)
        if request.rid not in self.reserved:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Decode without Reserve")
        if landed is None or landed != prompt_ids_of(request):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Decode before the KV landed")
        sampling = worker_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not self.honour_stop:
            del sampling.stop[:]
        tokens, reason, matched = self.model.generate(prompt_ids_of(request), sampling, request.rid)
        if tokens[0] != request.first_token:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "first token differs from prefill's")
        gone = threading.Event()
        context.add_callback(gone.set)
        sent, chunks = 1, 0
        while sent < len(tokens):
            if self.die_after_chunks is not None and chunks >= self.die_after_chunks:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake decode worker died")
            if self.chunk_delay_s and gone.wait(self.chunk_delay_s):
                return
            batch = tokens[sent : sent + self.chunk_size]
            sent += len(batch)
            last = sent >= len(tokens)
            logprobs = (
                [logprob_at(k) for k in range(sent - len(batch), sent)] if request.sampling.logprobs else []
            )
            chunks += 1
            yield worker_pb2.DecodeChunk(
                token_ids=batch,
                logprobs=logprobs,
                finish_reason=reason if last else "",
                matched_stop=matched if last else "",
                completion_tokens=sent,
            )
        self.finished.append(request.rid)

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortReply:
        self.aborted.append(request.rid)
        return worker_pb2.AbortReply(found=self.reserved.pop(request.rid, None) is not None)

    def Health(
        self, request: worker_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> worker_pb2.HealthReply:
        return worker_pb2.HealthReply(role="decode", model="fake", ready=True)


@dataclass
class FakePrefillWorker(worker_pb2_grpc.PrefillWorkerServicer):
    model: ToyModel
    fail_with: grpc.StatusCode | None = None
    fail_details: str = "fake prefill failure"
    delay_s: float = 0.0  # a slow prefill (the router may give up on it meanwhile)
    finish_override: str = ""  # report this finish reason with the first token (e.g. "abort")
    requests: list[worker_pb2.PrefillRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    _seen: list[list[int]] = field(default_factory=list)
    _srv: _Server | None = None

    def start(self) -> FakePrefillWorker:
        self._srv = _serve(worker_pb2_grpc.add_PrefillWorkerServicer_to_server, self)
        return self

    @property
    def addr(self) -> str:
        assert self._srv is not None
        return self._srv.addr

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.server.stop(0)

    def reset(self) -> None:
        self.fail_with, self.delay_s, self.finish_override = None, 0.0, ""

    def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext
    ) -> worker_pb2.PrefillReply:
        self.requests.append(request)
        if self.fail_with is not None:
            context.abort(self.fail_with, self.fail_details)
        if self.delay_s:
            time.sleep(self.delay_s)
        prompt = prompt_ids_of(request)
        cached = max((_common_prefix(prompt, seen) for seen in self._seen), default=0)
        self._seen.append(prompt)
        with _LANDED_LOCK:
            if request.decode_addr not in _LANDED:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown decode worker")
            _LANDED[request.decode_addr][request.rid] = prompt  # the "KV" ships before we answer
        tokens, reason, _ = self.model.generate(prompt, request.sampling, request.rid)
        return worker_pb2.PrefillReply(
            rid=request.rid,
            first_token=tokens[0],
            first_logprob=logprob_at(0),
            cached_tokens=min(cached, len(prompt) - 1),
            cached_tokens_l2=min(cached, len(prompt) - 1) // 2,  # the fake's "host tier" gave half
            finish_reason=self.finish_override or (reason if len(tokens) == 1 else ""),
        )

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortReply:
        self.aborted.append(request.rid)
        return worker_pb2.AbortReply(found=False)

    def Health(
        self, request: worker_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> worker_pb2.HealthReply:
        return worker_pb2.HealthReply(role="prefill", model="fake", ready=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
