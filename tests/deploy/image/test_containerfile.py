"""The Containerfile's invariants, read from the file itself (no build): what the chart and the docs
rely on. A build that honours them is tested in test_image.py (marker `image`)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONTAINERFILE = ROOT / "Containerfile"
BUILD_SH = ROOT / "scripts" / "image" / "build.sh"


@dataclass(frozen=True)
class Instruction:
    op: str  # upper case: FROM, RUN, ARG, ...
    args: str  # the rest of the logical line, continuations joined


def parse(text: str) -> list[Instruction]:
    """Logical lines of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    assert not pending, "a continuation runs off the end of the file"
    return out


def args_defaults(ins: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for i in ins:
        if i.op == "ARG" and "=" in i.args:
            k, v = i.args.split("=", 1)
            defaults.setdefault(k, v)
    return defaults


def expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def env_of(ins: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in ins:
        if i.op == "ENV":
            for tok in shlex.split(i.args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


@pytest.fixture(scope="module")
def ins() -> list[Instruction]:
    return parse(CONTAINERFILE.read_text())


def test_parser_joins_continuations_and_drops_comments() -> None:
    got = parse("# c\nFROM x\nRUN a \\\n  # inner comment\n  b\nUSER 1\n")
    assert got == [Instruction("FROM", "x"), Instruction("RUN", "a  b"), Instruction("USER", "1")]


def test_every_from_is_built_here(ins: list[Instruction]) -> None:
    """No registry is reachable: each FROM is the locally built base (localhost/...) or an earlier stage."""
    defaults = args_defaults(ins)
    stages: set[str] = set()
    froms = [i for i in ins if i.op == "FROM"]
    assert froms
    for f in froms:
        parts = f.args.split()
        image = expand(parts[0], defaults)
        assert image.startswith("localhost/") or image in stages or image == "scratch", image
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    assert defaults["BASE"].startswith("localhost/swaserve-base")


def test_runs_as_a_non_root_user(ins: list[Instruction]) -> None:
    defaults = args_defaults(ins)
    users = [expand(i.args, defaults) for i in ins if i.op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, users[-1]  # numeric: runAsNonRoot can verify it


def test_models_and_home_are_volumes(ins: list[Instruction]) -> None:
    volumes = [v for i in ins if i.op == "VOLUME" for v in json.loads(i.args)]
    home = env_of(ins)["SWASERVE_HOME"]
    assert "/models" in volumes
    assert any(home == v or home.startswith(v.rstrip("/") + "/") for v in volumes), (home, volumes)


def test_entrypoint_is_swaserve_under_an_init(ins: list[Instruction]) -> None:
    (entry,) = [json.loads(i.args) for i in ins if i.op == "ENTRYPOINT"]
    assert entry[-1] == "swaserve"
    assert entry[0].endswith("tini")  # PID 1 forwards SIGTERM and reaps `swaserve up`'s children
    assert "/opt/swaserve/bin" in env_of(ins)["PATH"].split(":")


def test_variant_build_arg_defaults_to_cpu_and_is_checked(ins: list[Instruction]) -> None:
    assert args_defaults(ins)["VARIANT"] == "cpu"
    run_with_check = [i.args for i in ins if i.op == "RUN" and "cpu|cuda" in i.args]
    assert run_with_check, "the Containerfile does not refuse an unknown VARIANT"


def test_installs_offline_from_the_mounted_wheels(ins: list[Instruction]) -> None:
    installs = [i.args for i in ins if i.op == "RUN" and "pip install" in i.args]
    assert installs
    for run in installs:
        assert "--no-index" in run, run
    mounts = re.findall(r"--mount=type=bind,source=([\w/.-]+)", " ".join(installs))
    script = BUILD_SH.read_text()
    for source in mounts:  # what the build script fills the context with
        assert f"$CONTEXT/{source}" in script, source


def test_build_args_the_script_passes_are_declared(ins: list[Instruction]) -> None:
    """buildah ignores an undeclared --build-arg with a warning: a typo would silently change nothing."""
    declared = {i.args.split("=")[0] for i in ins if i.op == "ARG"}
    passed = set(re.findall(r"--build-arg (\w+)=", BUILD_SH.read_text()))
    assert {"BASE", "VARIANT", "TORCH_VERSION", "DEPS_DIGEST", "PROJECT_DIGEST"} <= passed
    assert passed <= declared, passed - declared


def test_torch_version_default_matches_the_pin(ins: list[Instruction]) -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"torch\s*==", d)]
    assert args_defaults(ins)["TORCH_VERSION"] == pin.split("==")[1].strip()


def test_build_script_refuses_an_unknown_variant() -> None:
    r = subprocess.run(
        ["bash", str(BUILD_SH), "--variant", "rocm"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "VARIANT must be cpu or cuda, got 'rocm'" in r.stderr
