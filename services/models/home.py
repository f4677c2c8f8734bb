"""The swaserve home: where prepared models and derived artefacts live on this machine.

    <home>/models/<dir_name>/        one Hugging Face style checkpoint per known model (model_store.py)
    <home>/cache/<kind>/             derived artefacts (e.g. the generated Qwen2 tokenizer.json)

`<home>` is `$SWASERVE_HOME` if set and non-empty, else `~/.cache/swaserve`. Paths only: this module
imports nothing of swaserve, so builders (tokenizer_build) and the store can both use it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "SWASERVE_HOME"


def swaserve_home() -> Path:
    """`$SWASERVE_HOME` if set and non-empty, else `~/.cache/swaserve` (not created here)."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swaserve"


def models_dir() -> Path:
    return swaserve_home() / "models"


def cache_dir(kind: str) -> Path:
    """A per-user cache directory for derived artefacts of one kind, created on demand."""
    path = swaserve_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
