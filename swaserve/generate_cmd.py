"""`swaserve generate`: one prompt through the engine, printed as text or ids."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch


def parse_ids(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") from None


def run_generate(args: argparse.Namespace) -> int:
    from services.common.chat_template import load_chat_template
    from services.common.sampling_params import SamplingParams
    from services.engine.engine import Engine, EngineConfig
    from services.engine.request import Req
    from services.models.model_store import resolve_model

    model_dir = resolve_model(args.model)
    engine = Engine.from_dir(model_dir, EngineConfig(dtype=args.dtype))
    if args.prompt_ids is not None:
        prompt_ids = parse_ids(args.prompt_ids)
    else:
        if engine.tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer.json; use --prompt-ids")
        text = args.prompt
        if args.chat:
            text = load_chat_template(Path(model_dir)).render([{"role": "user", "content": args.prompt}])
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    first_logits: list[torch.Tensor] = []

    def keep_first(req: Req, logits: torch.Tensor) -> None:
        if not first_logits:
            first_logits.append(logits.clone())

    engine.logits_hook = keep_first
    (req,) = engine.generate([prompt_ids], params)
    if args.dump_logits:
        np.save(args.dump_logits, first_logits[0].numpy())
    if args.ids:
        print(" ".join(str(t) for t in req.output_ids))
    else:
        print(engine.text(req) if engine.tokenizer is not None else " ".join(map(str, req.output_ids)))
    print(f"[{len(prompt_ids)} prompt tokens, {len(req.output_ids)} generated, finish: {req.finish_reason.value if req.finish_reason else '?'}]", file=sys.stderr)
    return 0
