"""SamplingParams on the wire (proto/worker.proto) <-> `SamplingParams` (services/common/sampling_params.py).

proto3 has no "unset" for scalars: `top_p == 0` means the default 1.0; `temperature == 0` is greedy
(as in the OpenAI API); `max_tokens == 0` stays 0 and is refused by the engine's validation (the
router always sets it). Floats travel as float32 and are read back to 7 significant digits, so
0.7 arrives as 0.7. No torch here: the router builds these messages too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.sampling_params import SamplingParams
from services.common.worker_errors import ErrorKind, WorkerError
from services.proto_gen import worker_pb2


def _f32(x: float) -> float:
    return float(f"{x:.7g}")


def sampling_to_dict(msg: worker_pb2.SamplingParams) -> dict[str, Any]:
    d: dict[str, Any] = {
        "max_tokens": int(msg.max_tokens),
        "temperature": _f32(msg.temperature),
        "top_p": _f32(msg.top_p) if msg.top_p > 0 else 1.0,
        "top_k": int(msg.top_k),
        "stop": tuple(msg.stop),
        "stop_token_ids": tuple(int(t) for t in msg.stop_token_ids),
        "ignore_eos": bool(msg.ignore_eos),
        "logprobs": bool(msg.logprobs),
    }
    if msg.HasField("seed"):
        d["seed"] = int(msg.seed)
    return d


def parse_sampling(msg: worker_pb2.SamplingParams, rid: str) -> SamplingParams:
    """A request's validated SamplingParams; invalid ones are the worker's INVALID error, naming the rid."""
    try:
        return SamplingParams.from_dict(sampling_to_dict(msg))
    except ValueError as e:
        raise WorkerError(ErrorKind.INVALID, f"{rid}: {e}") from None


def sampling_to_proto(params: SamplingParams | Mapping[str, Any]) -> worker_pb2.SamplingParams:
    """From SamplingParams (or a dict with its field names; absent keys: defaults)."""
    d = params.__dict__ if isinstance(params, SamplingParams) else params
    msg = worker_pb2.SamplingParams(
        max_tokens=int(d.get("max_tokens", 16)),
        temperature=float(d.get("temperature", 1.0)),
        top_p=float(d.get("top_p", 1.0)),
        top_k=int(d.get("top_k", 0)),
        stop=list(d.get("stop", ())),
        stop_token_ids=[int(t) for t in d.get("stop_token_ids", ())],
        ignore_eos=bool(d.get("ignore_eos", False)),
        logprobs=bool(d.get("logprobs", False)),
    )
    if d.get("seed") is not None:
        msg.seed = int(d["seed"])
    return msg
