from pathlib import Path

import pytest

from bench.replay.agentic import AgenticSpec, generate, main
from bench.replay.plan import PlannedRequest, Scaling, TraceSlice, plan
from bench.replay.prompts import Continuations, PromptBuilder
from bench.replay.traces import load_trace


def test_written_trace_loads_and_is_seeded(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    assert main(["--out", str(out), "--duration", "200", "--seed", "3"]) == 0
    trace = load_trace(out)  # the replay's own Mooncake parser (ids per 512-token block checked)
    again = tmp_path / "b.jsonl"
    main(["--out", str(again), "--duration", "200", "--seed", "3"])
    assert out.read_text() == again.read_text()
    main(["--out", str(again), "--duration", "200", "--seed", "4"])
    assert out.read_text() != again.read_text()
    assert all(r.hash_ids[:12] == tuple(range(12)) for r in trace.requests)  # the shared system prompt


def test_next_turns_continue_the_previous_prompt_exactly(tmp_path: Path) -> None:
    records = generate(AgenticSpec(duration_s=300, seed=1))
    lengths = [r.input_length for r in records]
    assert 70_000 < sum(lengths) / len(lengths) < 100_000  # "~85k-token prompts"
    assert max(lengths) <= AgenticSpec().max_prompt
    (tmp_path / "t.jsonl").write_text("".join(r.json() + "\n" for r in records))
    planned = plan(load_trace(tmp_path / "t.jsonl"), TraceSlice(0, 10_000), Scaling())
    cont = Continuations.plan(planned)
    assert sum(1 for c in cont.continued if c) > len(planned) // 2  # most requests are next turns
    build = PromptBuilder(seed=0, continuations=cont)
    by_first: dict[
        int, PlannedRequest
    ] = {}  # a session's turns share their first block past the system prompt
    checked = 0
    for k, r in enumerate(planned):
        key = r.hash_ids[12]
        if key in by_first and cont.continued[k]:
            prev = by_first[key]
            assert cont.continued[k] == prev.input_length  # continues the whole previous prompt
            assert build.token_ids(r)[: prev.input_length] == build.token_ids(prev)
            checked += 1
        by_first[key] = r
        if checked >= 3:
            break
    assert checked == 3


@pytest.mark.parametrize(
    "bad",
    [{"system_tokens": 1000}, {"session_rate": 0}, {"growth_tokens": (10, 5)}, {"max_prompt": 20_000}],
)
def test_bad_specs_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        AgenticSpec(**bad)


def test_ideal_and_lru_bound_need_nothing_of_the_mooncake_traces(tmp_path: Path) -> None:
    # the comparison's hit-rate references, computed from this trace's own ids and block size
    from bench.compare.analysis import lru_bound
    from bench.replay.ideal import ideal_hit_rate

    path = tmp_path / "t.jsonl"
    path.write_text("".join(r.json() + "\n" for r in generate(AgenticSpec(duration_s=200, seed=2))))
    planned = plan(load_trace(path), TraceSlice(0, 10_000), Scaling())
    cont = Continuations.plan(planned)
    ideal = ideal_hit_rate(planned, cont.continued)
    assert 0.7 < ideal < 1.0  # sessions resume their whole previous prompt
    assert ideal_hit_rate(planned) < ideal  # without continuations each turn stops at its last full block
    assert lru_bound(planned, 1 << 40, cont) == pytest.approx(ideal)  # nothing evicted: the ideal
    assert lru_bound(planned, 256 * 1024, cont) < ideal  # two sessions' worth of KV: evictions
