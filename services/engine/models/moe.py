"""Feed-forward blocks: the dense SwiGLU MLP and the routed mixture of experts.

Routing (DeepSeek-V3 "noaux_tc", as MiMo-V2 uses it), per token, all in fp32:
  scores  = sigmoid(x @ gate.weight^T)                      [E]
  choice  = scores + e_score_correction_bias                 used only to pick experts
  groups  = top `topk_group` of `n_group` groups, a group scored by the sum of its best two choices
  experts = top_k of `choice` within the picked groups
  weights = scores[experts] (un-biased), / their sum if norm_topk_prob, * routed_scaling_factor
Parameter names follow the checkpoint: mlp.gate.weight, mlp.gate.e_score_correction_bias,
mlp.experts.{e}.{gate,up,down}_proj.weight, mlp.shared_experts.{gate,up,down}_proj.weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.models.config import MoESpec


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(
    scores: torch.Tensor,
    correction_bias: torch.Tensor,
    spec: MoESpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E] (post-sigmoid, fp32) -> (weights [T, top_k] fp32, expert ids [T, top_k])."""
    choice = scores + correction_bias.float()
    if spec.n_group > 1:
        per_group = choice.view(choice.shape[0], spec.n_group, -1)
        group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        picked = group_scores.topk(spec.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, picked, True)
        expert_mask = group_mask[:, :, None].expand_as(per_group).reshape_as(choice)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    expert_ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, expert_ids


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Chooses experts, never weighs them; kept fp32 whatever the model dtype (see CausalLM.to_dtype).
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> sigmoid scores [T, E] in fp32."""
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))


class MoE(nn.Module):
    def __init__(self, hidden_size: int, spec: MoESpec) -> None:
        super().__init__()
        self.spec = spec
        self.gate = Router(hidden_size, spec.num_experts)
        self.experts = nn.ModuleList(
            SwiGLU(hidden_size, spec.intermediate_size) for _ in range(spec.num_experts)
        )
        self.shared_experts = (
            SwiGLU(hidden_size, spec.intermediate_size * spec.num_shared_experts)
            if spec.num_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route(self.gate(x), self.gate.e_score_correction_bias, self.spec)
        out = torch.zeros_like(x)
        for expert in expert_ids.unique().tolist():
            tokens, slot = torch.where(expert_ids == expert)
            y = self.experts[expert](x[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
