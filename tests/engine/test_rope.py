from __future__ import annotations

import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import apply_rotary_pos_emb

from services.engine.models.rope import Rotary, inv_frequencies


def hf_rotate(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' MiMo rope on [T, H, D] tensors (its cos/sin construction, its apply)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    q_hf, k_hf = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


@pytest.mark.parametrize(
    ("head_dim", "rotary_dim", "theta"),
    [
        (192, 64, 5_000_000.0),
        (192, 64, 10_000.0),
        (64, 64, 10_000.0),
        (16, 5, 10_000.0),
    ],  # Flash full/SWA, Llama, odd
)
def test_matches_transformers_on_packed_positions(head_dim: int, rotary_dim: int, theta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 4, head_dim, generator=gen), torch.randn(9, 2, head_dim, generator=gen)
    positions = torch.tensor([0, 1, 2, 3, 130, 131, 7, 8, 100_000])  # three sequences packed
    ours = Rotary(theta, rotary_dim).apply(q, k, positions)
    ref = hf_rotate(q, k, positions, theta, rotary_dim)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_the_rotary_dims_move_and_norms_are_kept() -> None:
    q = torch.randn(5, 3, 192)
    positions = torch.arange(5) * 37
    rotated, _ = Rotary(10_000.0, 64).apply(q, q, positions)
    assert torch.equal(rotated[..., 64:], q[..., 64:])
    assert not torch.allclose(rotated[1:, :, :64], q[1:, :, :64])
    torch.testing.assert_close(rotated[..., :64].norm(dim=-1), q[..., :64].norm(dim=-1))
    assert torch.equal(rotated[0], q[0])  # position 0 is the identity


def test_scores_depend_only_on_relative_position() -> None:
    rotary = Rotary(10_000.0, 32)
    q, k = torch.randn(1, 1, 48), torch.randn(1, 1, 48)

    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        rq, _ = rotary.apply(q, q, torch.tensor([q_pos]))
        _, rk = rotary.apply(k, k, torch.tensor([k_pos]))
        return (rq * rk).sum()

    torch.testing.assert_close(score(10, 3), score(1010, 1003), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_theta_sets_the_frequencies() -> None:
    inv = inv_frequencies(10_000.0, 8)
    torch.testing.assert_close(inv, torch.tensor([1.0, 10_000.0**-0.25, 10_000.0**-0.5, 10_000.0**-0.75]))
    assert len(inv_frequencies(10_000.0, 5)) == 3  # odd rotary dim: ceil(5 / 2) pairs, as in transformers


def test_zero_rotary_dim_is_the_identity() -> None:
    q = torch.randn(3, 2, 8)
    assert Rotary(10_000.0, 0).apply(q, q, torch.arange(3))[0] is q
