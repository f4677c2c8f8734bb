"""A real replay: a hand-made Mooncake-format trace against a local cluster (`swaserve up`: redis-server,
router, one prefill and one decode worker of mimo-tiny, all real processes).

Why measured <= ideal holds exactly, with no tolerance: the ideal is the longest prefix each prompt
shares token for token with any earlier prompt (bench/replay/ideal.py; different ids give
unrelated random ids, a chance match of a whole 16-token page is out of reach) under an infinite
cache; everything the cluster adds only takes away: its hits are whole 16-token pages (rounded
down), window-safe, bounded by eviction and by the request that holds a prefix having finished its
prefill, and a fully cached prompt still computes its last token. An earlier request's *output* is
not in a later prompt, and id prompts get no BOS. So cached <= ideal per request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.replay.main import main as replay_main
from swaserve.cli import main as cli_main
from tests.integration.up_cluster import swaserve_up

MODEL = "mimo-tiny"
PROMPT_SCALE = 16  # 512-token trace blocks become 32 tokens: prompts of 20 to 320 tokens

# (timestamp ms, hash_ids, input_length, output_length): a shared first block (a system prompt),
# three conversations whose turns extend the previous turn's blocks, one repeated prompt, singletons
TRACE = [
    (0, [0, 1, 2, 3], 2048, 6),
    (300, [0, 10, 11], 1400, 4),
    (600, [0, 20], 700, 5),
    (1200, [0, 1, 2, 3, 4, 5, 6], 3584, 8),
    (1200, [0, 10, 11, 12, 13], 2560, 3),
    (1800, [0, 30, 31, 32], 1800, 6),
    (2400, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 5000, 7),
    (2700, [0, 10, 11, 12, 13, 14, 15], 3584, 5),
    (3000, [0, 1, 2, 3], 2048, 2),
    (3600, [0, 30, 31, 32, 33, 34], 3072, 6),
    (3600, [0, 40, 41], 1100, 1),
    (4200, [0, 10, 11, 12, 13, 14, 15, 16, 17], 4200, 8),
    (5400, [0, 10, 60, 61], 1800, 4),  # the next turn of request 1: block 11 grew into 60
]


def _write_trace(path: Path, rows: list[tuple[int, list[int], int, int]]) -> Path:
    with path.open("w") as f:
        for t, ids, n, m in rows:
            assert len(ids) == math.ceil(n / 512)
            f.write(
                json.dumps({"timestamp": t, "input_length": n, "output_length": m, "hash_ids": ids}) + "\n"
            )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("replay") / "up.log"
    with swaserve_up(log, "--model", MODEL) as base:
        yield base


def test_replay_of_a_shared_prefix_trace(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _write_trace(tmp_path / "trace.jsonl", TRACE)
    out = tmp_path / "replay.json"
    argv = ["--trace", str(trace), "--target", cluster, "--prompt-scale", str(PROMPT_SCALE)]
    assert replay_main([*argv, "--json", str(out), "--detailed", "--no-progress"]) == 0
    data = json.loads(out.read_text())

    assert (data["sent"], data["completed"], data["failed"]) == (13, 13, 0), data["errors"]
    rows = data["requests"]
    assert [r["output_tokens"] for r in rows] == [m for *_, m in TRACE]  # ignore_eos: exactly as asked
    assert [r["prompt_tokens"] for r in rows] == [math.ceil(n / PROMPT_SCALE) for _, _, n, _ in TRACE]
    assert data["total_output_tokens"] == sum(m for *_, m in TRACE)
    for r in rows:
        assert r["cached_tokens"] <= r["ideal_hit_tokens"], r
        assert r["started_s"] >= r["scheduled_s"]
        assert r["ttft_ms"] <= r["e2el_ms"]
        assert len(r["itl_ms"]) <= r["output_tokens"] - 1
    assert 0 < data["measured_hit_rate"] <= data["ideal_hit_rate"]
    # ideal by hand, blocks of 32 tokens: requests 4 and 9 share only the 24 and 17 tokens of
    # blocks 11 and 32 that requests 1 and 5 sent; the last one starts with request 1 (88 tokens)
    hits = [0, 32, 32, 128, 88, 32, 224, 160, 128, 113, 32, 224, 88]
    prompts = [math.ceil(n / PROMPT_SCALE) for _, _, n, _ in TRACE]
    assert [r["ideal_hit_tokens"] for r in rows] == hits
    assert data["ideal_hit_rate"] == pytest.approx(sum(hits) / sum(prompts))
    # a conversation's next turn finds at least the page-aligned previous turn (one prefill worker)
    assert rows[3]["cached_tokens"] >= 128 - 16
    # and a continued turn resumes at the previous prompt's end (88), page-aligned: 80
    assert rows[12]["cached_tokens"] >= 80
    assert data["setup"]["block_size"] == 32 and data["setup"]["model"] == MODEL
    # the report is printed, last
    printed = capsys.readouterr().out
    assert "Successful requests:" in printed and printed.rstrip().endswith("=" * 50)


def test_cli_entry_counts_a_failed_request_and_carries_on(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the second prompt (70000 / 16 = 4375 tokens) is longer than mimo-tiny's 4096-token context
    trace = _write_trace(tmp_path / "t.jsonl", [(0, [0, 1], 1000, 3), (100, list(range(100, 237)), 70000, 3)])
    out = tmp_path / "r.json"
    argv = ["bench", "replay", "--trace", str(trace), "--target", cluster, "--prompt-scale", "16"]
    assert cli_main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["completed"], data["failed"]) == (1, 1)
    assert data["errors"][0].startswith("HTTP 400")
    assert data["total_output_tokens"] == 3
    printed = capsys.readouterr().out
    assert "Failed requests:                         1" in printed
    assert "HTTP 400" in printed
