"""Reference paths on a bare `CausalLM`, for tests: random weights and greedy generation.

Neither is used in serving (the engine samples through services/engine/sampling.py and tiny
default models are written by services/models/model_init.py), so they live here.
"""

from __future__ import annotations

import torch

from services.engine.models.attention import DenseBackend
from services.engine.models.causal_lm import CausalLM


@torch.no_grad()
def init_random_(model: CausalLM, seed: int, std: float = 0.02) -> CausalLM:
    """Random weights in place: every tensor non-trivial (norms near 1, sinks and correction biases
    non-zero) so that no code path hides behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith(("attention_sink_bias", "e_score_correction_bias")):
            param.copy_(noise)
        else:
            param.copy_(std * noise)
    return model


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Greedy continuations of several prompts at once: packed prefill, then packed one-token steps
    on a DenseBackend. A sequence stops after `max_new_tokens` or after emitting one of `stop_ids`."""
    device = model.model.embed_tokens.weight.device
    backend = DenseBackend()
    outputs: list[list[int]] = [[] for _ in prompts]
    pending = {i: list(p) for i, p in enumerate(prompts)}  # seq id -> tokens not yet in its KV
    while pending and max_new_tokens > 0:
        ids = list(pending)
        positions = backend.schedule([(i, len(pending[i])) for i in ids]).to(device)
        tokens = torch.tensor([tok for i in ids for tok in pending[i]], device=device)
        hidden = model(tokens, positions, backend)
        last_rows = torch.tensor(
            [seg.batch_start + seg.num_tokens - 1 for seg in backend.segments], device=device
        )
        next_tokens = model.compute_logits(hidden[last_rows]).argmax(dim=-1).tolist()
        for i, tok in zip(ids, next_tokens, strict=True):
            outputs[i].append(tok)
            done = len(outputs[i]) >= max_new_tokens or tok in stop_ids
            if done:
                del pending[i]
                backend.release(i)
            else:
                pending[i] = [tok]
    return outputs
