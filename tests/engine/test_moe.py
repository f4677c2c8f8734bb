from __future__ import annotations

import pytest
import torch
from transformers import MiMoV2FlashConfig
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashMLP, MiMoV2FlashMoE

from services.engine.models.moe import MoE, SwiGLU, route
from services.models.config import MoESpec

HIDDEN = 16


def brute_force_route(scores: torch.Tensor, bias: torch.Tensor, spec: MoESpec) -> list[dict[int, float]]:
    """Per token: rank groups by the sum of their two best biased scores, keep `topk_group` groups,
    take the top_k biased scores inside them, weigh by the un-biased scores."""
    per_group = spec.num_experts // spec.n_group
    routes = []
    for s in scores:
        choice = (s + bias).tolist()
        groups = range(spec.n_group)
        group_score = {g: sum(sorted(choice[g * per_group : (g + 1) * per_group])[-2:]) for g in groups}
        kept = sorted(groups, key=lambda g: -group_score[g])[: spec.topk_group]
        candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -choice[e])[: spec.top_k]
        total = sum(float(s[e]) for e in chosen) if spec.norm_topk_prob else 1.0
        routes.append({e: float(s[e]) / total * spec.routed_scaling_factor for e in chosen})
    return routes


@pytest.mark.parametrize(
    "spec",
    [
        MoESpec(
            num_experts=16, top_k=3, intermediate_size=8, n_group=4, topk_group=2, routed_scaling_factor=2.5
        ),
        MoESpec(num_experts=8, top_k=2, intermediate_size=8),
        MoESpec(num_experts=8, top_k=2, intermediate_size=8, norm_topk_prob=False),
    ],
)
def test_route_matches_brute_force(spec: MoESpec) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(20, spec.num_experts, generator=gen))
    bias = 0.3 * torch.randn(spec.num_experts, generator=gen)
    weights, ids = route(scores, bias, spec)
    got = [dict(zip(i.tolist(), w.tolist(), strict=True)) for i, w in zip(ids, weights, strict=True)]
    want = brute_force_route(scores, bias, spec)
    assert [set(g) for g in got] == [set(w) for w in want]
    for g, w in zip(got, want, strict=True):
        assert all(abs(g[e] - w[e]) < 1e-6 for e in w)


def test_correction_bias_picks_experts_but_does_not_weigh_them() -> None:
    spec = MoESpec(num_experts=4, top_k=2, intermediate_size=8)
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.1]])
    weights, ids = route(scores, torch.tensor([0.0, 0.0, 0.0, 5.0]), spec)
    assert sorted(ids[0].tolist()) == [0, 3]  # expert 3 chosen only thanks to its bias
    weight_of = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
    assert weight_of[3] == pytest.approx(0.1 / 1.0) and weight_of[0] == pytest.approx(0.9 / 1.0)


def hf_config(**overrides: object) -> MiMoV2FlashConfig:
    kwargs: dict[str, object] = dict(
        hidden_size=HIDDEN,
        intermediate_size=24,
        moe_intermediate_size=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        num_hidden_layers=2,
    )
    kwargs.update(overrides)
    return MiMoV2FlashConfig(**kwargs)  # type: ignore[arg-type]


@torch.no_grad()
@pytest.mark.parametrize(("n_group", "topk_group", "scaling"), [(1, 1, 1.0), (4, 2, 1.5)])
def test_moe_block_matches_transformers(n_group: int, topk_group: int, scaling: float) -> None:
    torch.manual_seed(0)
    ref = MiMoV2FlashMoE(hf_config(n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling))
    ref.gate.weight.normal_(0, 0.5)
    ref.gate.e_score_correction_bias.normal_(0, 0.3)
    ref.experts.gate_up_proj.normal_(0, 0.3)
    ref.experts.down_proj.normal_(0, 0.3)
    ours = MoE(
        HIDDEN, MoESpec(8, 3, 12, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling)
    )
    ours.gate.weight.copy_(ref.gate.weight)
    ours.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
    for e, expert in enumerate(ours.experts):
        assert isinstance(expert, SwiGLU)
        gate, up = ref.experts.gate_up_proj[e].chunk(2)
        expert.gate_proj.weight.copy_(gate)
        expert.up_proj.weight.copy_(up)
        expert.down_proj.weight.copy_(ref.experts.down_proj[e])
    x = torch.randn(30, HIDDEN)
    torch.testing.assert_close(ours(x), ref(x[None])[0], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_dense_mlp_matches_transformers() -> None:
    ref = MiMoV2FlashMLP(hf_config())
    ours = SwiGLU(HIDDEN, 24)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(ours(x), ref(x))


@torch.no_grad()
def test_shared_experts_add_to_the_routed_output() -> None:
    torch.manual_seed(1)
    with_shared = MoE(HIDDEN, MoESpec(8, 2, 12, num_shared_experts=2))
    for p in with_shared.parameters():
        p.normal_(0, 0.3)
    assert with_shared.shared_experts is not None and with_shared.shared_experts.up_proj.weight.shape == (
        24,
        HIDDEN,
    )
    routed_only = MoE(HIDDEN, MoESpec(8, 2, 12))
    routed_only.load_state_dict(with_shared.state_dict(), strict=False)
    x = torch.randn(6, HIDDEN)
    torch.testing.assert_close(with_shared(x), routed_only(x) + with_shared.shared_experts(x))
