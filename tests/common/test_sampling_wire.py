"""SamplingParams on the wire: a round trip keeps every field; proto3 zeros mean the defaults."""

from __future__ import annotations

import pytest

from services.common.sampling_wire import sampling_to_dict, sampling_to_proto
from services.proto_gen import worker_pb2

CASES = [
    {"max_tokens": 7, "temperature": 0.7, "top_p": 0.95, "top_k": 40, "seed": 0, "stop": ("\n\n", "END"),
     "stop_token_ids": (2, 151645), "ignore_eos": True, "logprobs": True},
    {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": (), "stop_token_ids": (),
     "ignore_eos": False, "logprobs": False},
]  # fmt: skip


@pytest.mark.parametrize("d", CASES)
def test_round_trip_keeps_every_field(d):
    wire = worker_pb2.SamplingParams.FromString(sampling_to_proto(d).SerializeToString())
    assert sampling_to_dict(wire) == d


def test_seed_zero_is_not_an_absent_seed():
    assert sampling_to_dict(sampling_to_proto({"seed": 0}))["seed"] == 0
    assert "seed" not in sampling_to_dict(sampling_to_proto({}))


def test_proto3_zeros_mean_defaults_except_max_tokens():
    d = sampling_to_dict(worker_pb2.SamplingParams())
    assert (d["top_p"], d["temperature"], d["max_tokens"]) == (1.0, 0.0, 0)
