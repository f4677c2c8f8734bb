"""Model names resolve to complete, cached checkpoint dirs under $SWASERVE_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.models import model_store
from services.models.home import swaserve_home
from services.models.model_store import (
    STAMP_FILE,
    UnknownModelError,
    find_known,
    resolve_model,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWASERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_tiny(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the mimo-tiny builder by a quick one that records where it was asked to build."""
    calls: list[Path] = []

    def build(out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setitem(model_store._BUILDERS, "mimo-tiny", build)
    return calls


def test_home_from_env_or_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWASERVE_HOME", str(tmp_path))
    assert swaserve_home() == tmp_path
    monkeypatch.delenv("SWASERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert swaserve_home() == tmp_path / "user" / ".cache" / "swaserve"


def test_directory_is_used_as_is(home: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve_model(model_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir
    assert not home.exists()


def test_unknown_name_lists_the_known_ones(home: Path) -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve_model("llama-9000")
    message = str(err.value)
    assert "llama-9000" in message and "smollm2" in message and "mimo-tiny" in message
    assert isinstance(err.value, ValueError)


def test_aliases() -> None:
    names = {"smollm2", "SmolLM2-135M-Instruct", "SMOLLM2"}
    assert {known.dir_name for name in names if (known := find_known(name))} == {"SmolLM2-135M-Instruct"}
    assert find_known("mimo-tiny") is not None and find_known("mimo") is None
    assert model_store.DEFAULT_MODEL == "SmolLM2-135M-Instruct"


def test_built_once_then_reused(
    home: Path, fake_tiny: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first = resolve_model("mimo-tiny")
    assert first == home / "models" / "mimo-tiny"
    assert (first / "config.json").is_file() and json.loads((first / STAMP_FILE).read_text())["version"] == 1
    assert "preparing mimo-tiny" in capsys.readouterr().err
    assert resolve_model("mimo-tiny") == first and len(fake_tiny) == 1
    assert fake_tiny[0] != first  # built elsewhere, renamed into place
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == ["mimo-tiny"]


def test_crash_mid_build_leaves_no_model(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setitem(model_store._BUILDERS, "mimo-tiny", crash)
    with pytest.raises(RuntimeError):
        resolve_model("mimo-tiny")
    assert not (home / "models" / "mimo-tiny").exists()
    assert not list((home / "models").glob(".tmp-*"))


def test_leftovers_are_swept_and_stale_models_rebuilt(home: Path, fake_tiny: list[Path]) -> None:
    models = home / "models"
    leftover = models / ".tmp-mimo-tiny-from-a-killed-process"
    leftover.mkdir(parents=True)
    unstamped = models / "mimo-tiny"  # e.g. copied by hand, or a dir from before stamps
    unstamped.mkdir()
    (unstamped / "old.bin").write_bytes(b"old")
    built = resolve_model("mimo-tiny")
    assert len(fake_tiny) == 1 and not leftover.exists() and not (built / "old.bin").exists()
    stamp = built / STAMP_FILE
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "version": 0}))
    resolve_model("mimo-tiny")
    assert len(fake_tiny) == 2


def test_mimo_tiny_is_init_model_seed_0(home: Path) -> None:
    path = resolve_model("mimo-tiny")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mimo_v2_flash" and config["hidden_size"] == 256
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert (home / "cache" / "tokenizers").is_dir()  # the tokenizer build is cached under the home


def test_smollm2_is_imported_from_the_gguf(home: Path) -> None:
    path = resolve_model("smollm2")
    assert path == home / "models" / "SmolLM2-135M-Instruct" == resolve_model()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "Hugging Face" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
