"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into a `CausalLM`.

What a checkpoint may hold, and how its names are rewritten, is services/models/checkpoint.py's
business; this builds the model on the meta device, checks the tensors against it and assigns them.
"""

from __future__ import annotations

import json
import os

import torch

from services.engine.models.causal_lm import CausalLM
from services.models.checkpoint import FP32_SUFFIXES, check_against_model, read_safetensors, to_model_names
from services.models.config import load_config


def load_model(
    model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """The model of `model_dir` in eval mode, without gradients; its ModelConfig is `model.config`."""
    config = load_config(model_dir)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)
    tensors = to_model_names(read_safetensors(model_dir), config, raw_config.get("quantization_config"))
    with torch.device("meta"):
        model = CausalLM(config)
    check_against_model(tensors, model.state_dict())
    for name, tensor in tensors.items():
        tensors[name] = tensor.to(torch.float32 if name.endswith(FP32_SUFFIXES) else dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.to(device).eval().requires_grad_(False)
    return model
