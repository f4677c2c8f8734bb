"""scripts/image/prepare.py: the image's requirements per variant, the CUDA wheel lookup and its
refusal, the marker fix-up for the base's Python, and the cache digests. Wheels here are real zip
files with real METADATA, made in a temp directory."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("image_prepare", ROOT / "scripts" / "image" / "prepare.py")
assert _spec is not None and _spec.loader is not None
prepare = importlib.util.module_from_spec(_spec)
sys.modules["image_prepare"] = prepare
_spec.loader.exec_module(prepare)

DEPS = ["torch==2.13.0", "numpy==2.4.6", "redis==8.1.0"]


def make_wheel(
    d: Path,
    name: str,
    version: str,
    requires: tuple[str, ...] | list[str] = (),
    tag: str = "py3-none-any",
    date: tuple[int, int, int, int, int, int] = (2020, 1, 1, 0, 0, 0),
) -> Path:
    path = d / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo(f"{name.replace('-', '_')}/__init__.py", date), "x = 1\n")
        z.writestr(zipfile.ZipInfo(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", date), meta)
    return path


@pytest.mark.parametrize(
    ("variant", "wheel", "torch_line"),
    [
        ("cpu", None, "torch==2.13.0+cpu"),
        (
            "cuda",
            "/w/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
            "/w/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        ),
    ],
)
def test_requirements_pin_torch_per_variant(variant: str, wheel: str | None, torch_line: str) -> None:
    got = prepare.requirements(DEPS, variant, wheel)
    assert got == [torch_line, "numpy==2.4.6", "redis==8.1.0"]


@pytest.mark.parametrize(
    ("deps", "variant", "wheel", "message"),
    [
        (DEPS, "rocm", None, "VARIANT must be one of cpu, cuda"),
        (DEPS, "cuda", None, "needs --torch-wheel"),
        (["torch>=2.13", "numpy"], "cpu", None, "must pin torch exactly"),
        (["numpy==2.4.6"], "cpu", None, "no torch dependency"),
    ],
)
def test_requirements_bad_input(deps: list[str], variant: str, wheel: str | None, message: str) -> None:
    with pytest.raises(prepare.ImageBuildError, match=message):
        prepare.requirements(deps, variant, wheel)


def test_requirements_from_this_pyproject_pin_the_cpu_wheel() -> None:
    deps = prepare.project_table()["dependencies"]
    got = prepare.requirements(deps, "cpu")
    assert got[0].startswith("torch==") and got[0].endswith("+cpu")
    assert len(got) == len(deps)


def test_find_cuda_torch_skips_cpu_builds_and_other_versions(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    make_wheel(tmp_path / "a", "torch", "2.13.0+cpu", tag="cp311-cp311-manylinux_2_28_x86_64")
    make_wheel(tmp_path / "a", "torch", "2.14.1", tag="cp311-cp311-manylinux_2_28_x86_64")
    with pytest.raises(prepare.ImageBuildError) as e:
        prepare.find_cuda_torch("2.13.0", [tmp_path / "a", tmp_path / "nowhere"])
    msg = str(e.value)
    assert "no CUDA build of torch 2.13.0" in msg and str(tmp_path / "nowhere") in msg
    assert "torch-2.13.0+cpu" in msg and "torch-2.14.1" in msg  # says what it did find
    cuda = make_wheel(tmp_path / "b" / "deep", "torch", "2.13.0", tag="cp311-cp311-manylinux_2_28_x86_64")
    assert prepare.find_cuda_torch("2.13.0", [tmp_path / "a", tmp_path / "b"]) == cuda


def test_missing_evaluates_markers_for_the_target_python(tmp_path: Path) -> None:
    """What pip on the host's 3.11.7 leaves out: redis needs async-timeout below 3.11.3 only."""
    make_wheel(tmp_path, "redis", "8.1.0", ['async-timeout>=4.0.3; python_full_version < "3.11.3"'])
    make_wheel(tmp_path, "numpy", "2.4.6")
    make_wheel(tmp_path, "torch", "2.13.0+cpu", ["numpy", 'nvidia-x; platform_system == "Windows"'])
    reqs = ["torch==2.13.0+cpu", "numpy==2.4.6", "redis==8.1.0"]
    assert prepare.missing(tmp_path, reqs, "3.11.2") == ["async-timeout>=4.0.3"]
    assert prepare.missing(tmp_path, reqs, "3.11.7") == []
    make_wheel(tmp_path, "async-timeout", "5.0.1")
    assert prepare.missing(tmp_path, reqs, "3.11.2") == []


def test_missing_follows_extras_and_wheel_paths(tmp_path: Path) -> None:
    make_wheel(tmp_path, "uvicorn", "0.54.0", ["h11", 'uvloop; extra == "standard"'])
    make_wheel(tmp_path, "h11", "0.16.0")
    make_wheel(tmp_path, "torch", "2.13.0", ["nvidia-cublas==13.1; platform_system == 'Linux'"])
    assert prepare.missing(tmp_path, ["uvicorn==0.54.0"], "3.11.2") == []
    assert prepare.missing(tmp_path, ["uvicorn[standard]==0.54.0"], "3.11.2") == ["uvloop"]
    # a requirement given as a wheel's path (the cuda variant) stands for its distribution
    whl = "/elsewhere/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert prepare.missing(tmp_path, [whl], "3.11.2") == ["nvidia-cublas==13.1"]


def test_digest_ignores_zip_timestamps_not_content(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    make_wheel(a, "swaserve", "0.1.0", date=(2020, 1, 1, 0, 0, 0))
    make_wheel(b, "swaserve", "0.1.0", date=(2026, 12, 7, 23, 0, 0))  # the same code, rebuilt later
    make_wheel(c, "swaserve", "0.1.0", ["numpy"])  # different content
    assert (a / "swaserve-0.1.0-py3-none-any.whl").read_bytes() != (
        b / "swaserve-0.1.0-py3-none-any.whl"
    ).read_bytes()
    assert prepare.digest([a]) == prepare.digest([b])
    assert prepare.digest([a]) != prepare.digest([c])


def test_build_script_refuses_cuda_without_a_local_wheel(tmp_path: Path) -> None:
    """VARIANT=cuda stops before anything slow, saying where it looked and what to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, SWASERVE_WHEELHOUSE=str(tmp_path), VARIANT="cuda")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image" / "build.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert "no CUDA build of torch" in r.stderr and str(tmp_path) in r.stderr
    assert "refusing VARIANT=cuda" in r.stderr
    assert "==> image" not in r.stdout  # no step started
