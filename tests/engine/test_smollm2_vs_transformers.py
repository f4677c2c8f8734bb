"""The engine on SmolLM2-135M-Instruct's real weights against transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.models.model_store import resolve_model


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model("smollm2")


def test_prompt_logits_and_32_greedy_tokens_match(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    texts = ["The three primary colours are", "def fibonacci(n):\n    " * 3]
    eng = Engine.from_dir(smollm2_dir, EngineConfig(page_size=16, chunk_size=7))
    first: dict[str, torch.Tensor] = {}
    eng.logits_hook = lambda req, lg: first.setdefault(req.rid, lg.clone())
    prompts = [tok(t)["input_ids"] for t in texts]
    reqs = eng.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for prompt, req in zip(prompts, reqs, strict=True):
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            ref_logits = hf(ids).logits[0, -1].float()
            ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
        got = first[req.rid]
        assert float((got - ref_logits).abs().max()) <= 1e-4 * float(ref_logits.abs().max())
        assert req.output_ids == ref
