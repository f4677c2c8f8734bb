from __future__ import annotations

import math

import pytest
import torch

from services.engine.models.attention import DenseBackend, attention_reference, in_window
from services.engine.models.attention_backend import LayerAttn

WINDOW = 128


def test_swa_query_sees_itself_and_exactly_128_previous_tokens() -> None:
    q_pos, k_pos = torch.tensor([500]), torch.arange(0, 600)
    seen = k_pos[in_window(q_pos, k_pos, WINDOW)[0]]
    assert seen.tolist() == list(range(500 - 128, 501))
    assert len(seen) - 1 == 128  # neither 127 nor 129 previous tokens
    assert 500 - 129 not in seen.tolist() and 500 - 128 in seen.tolist()


@pytest.mark.parametrize(
    ("q", "k", "window", "visible"),
    [
        (200, 200, WINDOW, True),  # itself
        (200, 201, WINDOW, False),  # the future
        (200, 72, WINDOW, True),  # 128 back: the window's first token
        (200, 71, WINDOW, False),  # 129 back
        (200, 0, None, True),  # full attention sees the whole past
        (200, 201, None, False),
        (5, 0, WINDOW, True),  # shorter than the window: everything so far
    ],
)
def test_in_window_table(q: int, k: int, window: int | None, visible: bool) -> None:
    assert bool(in_window(torch.tensor([q]), torch.tensor([k]), window)[0, 0]) is visible


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: list[int],
    k_pos: list[int],
    window: int | None,
    sinks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query, one head at a time, with python-level masking and softmax."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], heads, v.shape[2], dtype=torch.float64)
    for h in range(heads):
        kvh = h * kv_heads // heads
        for i, p in enumerate(q_pos):
            keys = [j for j, kp in enumerate(k_pos) if kp <= p and (window is None or p - kp <= window)]
            logits = [float(q[i, h].double() @ k[j, kvh].double()) * scale for j in keys]
            extra = [] if sinks is None else [float(sinks[h])]
            m = max(logits + extra)
            denom = sum(math.exp(x - m) for x in logits + extra)
            for j, x in zip(keys, logits, strict=True):
                out[i, h] += math.exp(x - m) / denom * v[j, kvh].double()
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_reference_matches_naive_attention(window: int | None, with_sinks: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(4, 6, 8, generator=gen),
        torch.randn(10, 2, 8, generator=gen),
        torch.randn(10, 2, 5, generator=gen),
    )
    sinks = torch.randn(6, generator=gen) if with_sinks else None
    q_pos, k_pos = torch.arange(6, 10), torch.arange(10)  # the last 4 tokens of a 10-token sequence
    got = attention_reference(q, k, v, q_pos, k_pos, window=window, sinks=sinks, scale=0.3)
    want = naive_attention(q, k, v, q_pos.tolist(), k_pos.tolist(), window, sinks, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_sink_drains_mass_and_is_not_scaled() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(1, 1, 4, generator=gen),
        torch.randn(3, 1, 4, generator=gen),
        torch.randn(3, 1, 2, generator=gen),
    )
    pos = torch.tensor([2]), torch.arange(3)
    scale, sink = 0.5, 1.7
    plain = attention_reference(q, k, v, *pos, window=None, sinks=None, scale=scale)
    sunk = attention_reference(q, k, v, *pos, window=None, sinks=torch.tensor([sink]), scale=scale)
    mass = torch.exp((k[:, 0] @ q[0, 0]) * scale).sum()
    torch.testing.assert_close(
        sunk, plain * mass / (mass + math.exp(sink))
    )  # exp(sink), not exp(sink * scale)
    hopeless = attention_reference(q, k, v, *pos, window=None, sinks=torch.tensor([-1e4]), scale=scale)
    torch.testing.assert_close(hopeless, plain)


def layer(window: int | None, sinks: torch.Tensor | None = None, layer_id: int = 0) -> LayerAttn:
    return LayerAttn(layer_id=layer_id, window=window, sinks=sinks, scale=0.4)


def random_qkv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, 8, generator=gen),
        torch.randn(n, 2, 8, generator=gen),
        torch.randn(n, 2, 6, generator=gen),
    )


@pytest.mark.parametrize("window", [None, 4])
def test_dense_backend_packed_chunks_equal_one_shot(window: int | None) -> None:
    """Two sequences prefilled in uneven chunks, packed together, then decoded: every output equals
    attention over that sequence's whole history computed in one go."""
    sinks = torch.randn(4)
    seqs = {7: random_qkv(13, seed=7), 9: random_qkv(6, seed=9)}
    steps = [[(7, 5), (9, 6)], [(7, 7)], [(9, 0), (7, 1)]]  # (seq, tokens); 0 tokens: not in this batch
    backend = DenseBackend()
    done = {7: 0, 9: 0}
    for step in steps:
        batch = [(s, n) for s, n in step if n > 0]
        positions = backend.schedule(batch)
        q, k, v = (torch.cat([seqs[s][i][done[s] : done[s] + n] for s, n in batch]) for i in range(3))
        out = backend.attend(layer(window, sinks), q, k, v)
        assert positions.tolist() == [p for s, n in batch for p in range(done[s], done[s] + n)]
        row = 0
        for s, n in batch:
            fq, fk, fv = seqs[s]
            full = attention_reference(
                fq,
                fk[: done[s] + n],
                fv[: done[s] + n],
                torch.arange(len(fq)),
                torch.arange(done[s] + n),
                window=window,
                sinks=sinks,
                scale=0.4,
            )
            torch.testing.assert_close(out[row : row + n], full[done[s] : done[s] + n])
            row, done[s] = row + n, done[s] + n
    assert backend.seq_len(7) == 13 and backend.seq_len(9) == 6


def test_dense_backend_keeps_layers_apart_and_checks_positions() -> None:
    backend = DenseBackend()
    backend.schedule([(1, 3)])
    q, k, v = random_qkv(3, seed=0)
    backend.attend(layer(None, layer_id=0), q, k, v)
    with pytest.raises(RuntimeError, match="layer 0"):  # the same layer twice in one forward
        backend.attend(layer(None, layer_id=0), q, k, v)
    backend.attend(layer(None, layer_id=1), q, k, v)  # another layer starts empty


def test_dense_backend_rejects_bad_batches_and_forgets_released_sequences() -> None:
    backend = DenseBackend()
    with pytest.raises(ValueError, match="twice"):
        backend.schedule([(1, 2), (1, 3)])
    with pytest.raises(ValueError, match="at least one"):
        backend.schedule([(1, 0)])
    backend.schedule([(1, 4)])
    backend.attend(layer(None), *random_qkv(4, seed=0))
    backend.release(1)
    assert backend.seq_len(1) == 0
    assert backend.schedule([(1, 2)]).tolist() == [0, 1]
