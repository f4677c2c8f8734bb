"""`swaserve <service> FLAGS` runs the service module's own parser (what the chart's containers run)."""

from __future__ import annotations

import pytest

from swaserve.cli import SERVICES, main


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_help_is_the_module_parser(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--redis-url" in out  # flags every service has
    module, _ = SERVICES[name]
    assert module in out or f"swaserve-{name}" in out


def test_service_bad_flag_is_the_module_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["gcache", "--no-such-flag"])
    assert e.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
