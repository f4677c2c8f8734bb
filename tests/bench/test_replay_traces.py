"""Reading Mooncake JSONL and Azure 2023 CSV traces (small hand-made files, never /work/shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.replay.traces import guess_format, load_trace

MOONCAKE = [
    {"timestamp": 3000, "input_length": 1300, "output_length": 7, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 512, "output_length": 0, "hash_ids": [0]},
    {"timestamp": 1500, "input_length": 1025, "output_length": 40, "hash_ids": [0, 1, 5]},
]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line too
    return path


def test_mooncake_is_sorted_in_seconds_with_its_blocks(tmp_path: Path) -> None:
    trace = load_trace(_write_jsonl(tmp_path / "t.jsonl", MOONCAKE))
    assert trace.format == "mooncake"
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.5, 3.0]
    assert [r.input_length for r in trace.requests] == [512, 1025, 1300]
    assert [r.output_length for r in trace.requests] == [0, 40, 7]
    assert [r.hash_ids for r in trace.requests] == [(0,), (0, 1, 5), (0, 1, 2)]
    assert trace.block_size == 512
    assert trace.duration_s == 3.0


def test_mooncake_timestamps_count_from_the_first_request(tmp_path: Path) -> None:
    rows = [dict(r, timestamp=r["timestamp"] + 10_000) for r in MOONCAKE]  # type: ignore[operator]
    trace = load_trace(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.5, 3.0]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"timestamp": 0, "input_length": 1300, "output_length": 1, "hash_ids": [0, 1]}, "2 hash_ids"),
        ({"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [0, 1]}, "2 hash_ids"),
        ({"timestamp": 0, "input_length": 10, "output_length": 1}, "not a Mooncake"),
        ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}, "input_length"),
    ],
)
def test_mooncake_bad_records_name_their_line(
    tmp_path: Path, record: dict[str, object], message: str
) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", [MOONCAKE[0], record])
    with pytest.raises(ValueError, match=f"line 2: .*{message}"):
        load_trace(path)


def test_azure_timestamps_with_seven_digit_fractions_and_unique_blocks(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,1025,109\n"
        "2023-11-16 18:16:46.6805901,512,3\n"
    )
    trace = load_trace(path)
    assert trace.format == "azure"
    assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 4.314579, 60.0000001], abs=1e-6)
    assert [r.input_length for r in trace.requests] == [374, 1025, 512]
    assert [r.output_length for r in trace.requests] == [44, 109, 3]
    ids = [r.hash_ids for r in trace.requests]
    assert [len(i) for i in ids] == [1, 3, 1]  # ceil(input / 512)
    flat = [h for i in ids for h in i]
    assert len(set(flat)) == len(flat)  # no prefix information: nothing shared


def test_azure_needs_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,Tokens\n2023-11-16 18:15:46.68,3\n")
    with pytest.raises(ValueError, match="ContextTokens"):
        load_trace(path)


def test_format_from_the_extension_or_the_flag(tmp_path: Path) -> None:
    assert guess_format("x/trace.jsonl") == "mooncake"
    assert guess_format("x/AzureLLMInferenceTrace_conv.csv") == "azure"
    with pytest.raises(ValueError, match="--format"):
        guess_format("trace.txt")
    path = _write_jsonl(tmp_path / "trace.txt", MOONCAKE)
    assert len(load_trace(path, "mooncake").requests) == 3


def test_an_empty_trace_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_trace(path)
