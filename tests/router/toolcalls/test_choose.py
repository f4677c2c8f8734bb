"""Which parser a model gets: --tool-call-parser, or `auto` from its chat template and config."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.router.main import parse_args
from services.router.toolcalls import PARSERS, choose_parser
from tests.router.tool_models import TEMPLATES

MIMO = {"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash"}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


@pytest.mark.parametrize(
    ("setting", "template", "config", "want"),
    [
        ("auto", (TEMPLATES / "mimo_tools.jinja").read_text(), LLAMA, "mimo"),
        (
            "auto",
            (TEMPLATES / "hermes_tools.jinja").read_text(),
            MIMO,
            "hermes",
        ),  # the template's format wins
        ("auto", "{{ messages }}", MIMO, "mimo"),
        ("auto", "{{ messages }}", LLAMA, "hermes"),
        ("auto", "{{ messages }}", {}, "hermes"),
        ("hermes", (TEMPLATES / "mimo_tools.jinja").read_text(), MIMO, "hermes"),
        ("mimo", "", {}, "mimo"),
    ],
)
def test_choose_parser(setting: str, template: str, config: dict[str, object], want: str) -> None:
    assert choose_parser(setting, template, config) == want
    assert want in PARSERS


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        choose_parser("xml", "", {})


def test_router_flag(tmp_path: Path) -> None:
    base = ["--port", "1", "--model", str(tmp_path), "--prefill", "a:1", "--decode", "b:1"]
    assert parse_args(base).tool_call_parser == "auto"
    assert parse_args([*base, "--tool-call-parser", "mimo"]).tool_call_parser == "mimo"
    with pytest.raises(SystemExit):
        parse_args([*base, "--tool-call-parser", "xml"])
