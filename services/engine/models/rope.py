"""Rotary position embedding, rotate-half style, on the leading dims of each head.

Positions are explicit absolute positions per token ([T]), because a batch packs tokens of many
sequences that each start at their own offset. Nothing is cached or stored in a state dict: the
frequencies are a function of (theta, rotary_dim) and cost nothing to recompute.
"""

from __future__ import annotations

import torch

from services.models.config import AttentionSpec


def inv_frequencies(theta: float, rotary_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-i / rotary_dim) for even i < rotary_dim, fp32 (the Hugging Face 'default' rope)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (theta**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """Applies one layer kind's rotary embedding to q and k of shape [T, heads, head_dim]."""

    def __init__(self, theta: float, rotary_dim: int) -> None:
        self.theta = theta
        self.rotary_dim = rotary_dim

    @classmethod
    def for_spec(cls, spec: AttentionSpec) -> Rotary:
        return cls(spec.rope_theta, spec.rotary_dim)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] absolute positions -> cos, sin of shape [T, 1, rotated dims], computed in fp32."""
        inv_freq = inv_frequencies(self.theta, self.rotary_dim, positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary_dim == 0:
            return q, k
        cos, sin = self.cos_sin(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
