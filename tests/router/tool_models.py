"""Model directories for tool and reasoning tests: a model's files with a chat template that takes
tools (tests/router/templates/), the weights linked, not copied."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


def with_template(base: Path, template: str, out: Path) -> Path:
    """`base`'s model directory at `out`, its chat template replaced by templates/<template>.jinja."""
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "tokenizer_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / f"{template}.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out
