"""Host-side helpers of `make image` (scripts/image/build.sh); the standard library only.

    requirements VARIANT OUT [--torch-wheel PATH]   the image's requirements.txt from pyproject.toml
    find-cuda-torch VERSION [DIR ...]               a CUDA torch wheel on local disk, or exit 3 saying why
    digest PATH ...                                 one sha256 over files' names and bytes (cache keys)
    missing WHEELS REQS PYTHON_VERSION              requirements the wheels need on that Python but lack
    project-version                                 [project].version from pyproject.toml

The requirements are pyproject's `[project].dependencies` with the torch pin made explicit for the
variant: `torch==V+cpu` for cpu (the CPU wheel; a bare `torch==V` would let pip pick a CUDA build),
and for cuda the path of a CUDA wheel found on disk (pip cannot exclude `+cpu` by specifier, and a
`+cpu` wheel sorts above the plain version, so the wheel is named rather than matched).

`pip download --python-version` picks wheels for the target Python but evaluates environment markers
against the Python running pip: the host's 3.11.7 skips `async-timeout; python_full_version < "3.11.3"`,
which bookworm's 3.11.2 needs. `missing` evaluates every downloaded wheel's Requires-Dist for the
target version, so build.sh downloads what is left out until nothing is.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("cpu", "cuda")
_TORCH_PIN = re.compile(r"^torch\s*==\s*([0-9][0-9A-Za-z.]*)\s*$")


class ImageBuildError(ValueError):
    """Input the image build cannot use; the message says what to do."""


def project_table(pyproject: Path = ROOT / "pyproject.toml") -> dict:
    with pyproject.open("rb") as f:
        return tomllib.load(f)["project"]


def torch_version(deps: list[str]) -> str:
    """The version pyproject pins torch to (`torch==X.Y.Z`); anything looser is an error."""
    for dep in deps:
        name = re.match(r"\s*([A-Za-z0-9_.-]+)", dep)
        if name is not None and name.group(1).lower() == "torch":
            m = _TORCH_PIN.match(dep.strip())
            if m is None:
                raise ImageBuildError(f"pyproject.toml must pin torch exactly (torch==X.Y.Z), found {dep!r}")
            return m.group(1)
    raise ImageBuildError("pyproject.toml has no torch dependency")


def requirements(deps: list[str], variant: str, torch_wheel: str | None = None) -> list[str]:
    """pyproject's dependencies with the torch line rewritten for `variant` (see the module doc)."""
    if variant not in VARIANTS:
        raise ImageBuildError(f"VARIANT must be one of {', '.join(VARIANTS)}, got {variant!r}")
    version = torch_version(deps)
    if variant == "cpu":
        torch_line = f"torch=={version}+cpu"
    else:
        if torch_wheel is None:
            raise ImageBuildError("the cuda variant needs --torch-wheel (see find-cuda-torch)")
        torch_line = torch_wheel
    out = [torch_line if _TORCH_PIN.match(d.strip()) else d.strip() for d in deps]
    return out


def find_cuda_torch(version: str, dirs: list[Path]) -> Path:
    """The first torch `version` wheel for CPython 3.11 on Linux that is not a `+cpu` build, searched
    (recursively) in `dirs`; ImageBuildError naming every place looked in when there is none."""
    pattern = f"torch-{version}*-cp311-cp311-*linux*.whl"
    looked: list[str] = []
    others: list[str] = []
    for d in dict.fromkeys(dirs):  # each once, in order
        looked.append(str(d))
        if not d.is_dir():
            continue
        for wheel in sorted(d.rglob("torch-*.whl")):
            if wheel.match(pattern) and "+cpu" not in wheel.name:
                return wheel
            others.append(wheel.name)
    seen = f" (found only: {', '.join(sorted(set(others)))})" if others else ""
    raise ImageBuildError(
        f"no CUDA build of torch {version} for Python 3.11 on local disk{seen}; looked in: "
        f"{', '.join(looked) or '(nowhere)'}.\n"
        f"  The cuda variant installs it offline like every other wheel. On a machine with network:\n"
        f"    pip download torch=={version} --no-deps --python-version 3.11 --only-binary=:all: \\\n"
        f"      --platform manylinux_2_28_x86_64 -d WHEELS\n"
        f"  (PyPI's Linux torch is the CUDA build; the build fetches its nvidia-* wheels), then\n"
        f"    make image VARIANT=cuda SWASERVE_WHEELHOUSE=WHEELS"
    )


def digest(paths: list[Path]) -> str:
    """sha256 over (relative name, content) of every file under `paths`, in sorted order. A wheel's
    content is its members' names and bytes, not the zip's: a rebuilt wheel of the same code differs
    only in timestamps, and must not look like a change to the layer cache."""
    h = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for p in files:
            h.update(str(p.relative_to(top) if top.is_dir() else p.name).encode() + b"\0")
            if p.suffix == ".whl":
                with zipfile.ZipFile(p) as z:
                    for member in sorted(z.namelist()):
                        h.update(member.encode() + b"\0" + hashlib.sha256(z.read(member)).digest())
            else:
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(wheels: Path, reqs: list[str], python_version: str) -> list[str]:
    """Requirements that the wheels in `wheels` (and the top-level `reqs`) need on CPython
    `python_version` and that no wheel there provides, as requirement strings without markers."""
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment]
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(python_full_version=python_version, python_version=".".join(python_version.split(".")[:2]))
    env.update(implementation_version=python_version, implementation_name="cpython")
    env.update(platform_python_implementation="CPython", sys_platform="linux", os_name="posix")
    present: dict[str, list[str]] = {}  # canonical name -> Requires-Dist lines
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            headers = HeaderParser().parsestr(z.read(meta).decode("utf-8", "replace"))
        present[_canonical(headers["Name"])] = headers.get_all("Requires-Dist") or []
    # a wheel named by its path stands for its distribution (the name before the first dash)
    lines = [Path(r.strip()).name.split("-")[0] if r.strip().endswith(".whl") else r for r in reqs]
    todo = [Requirement(r) for r in lines if r.strip() and not r.lstrip().startswith("#")]
    needed: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = _canonical(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        if name not in present:
            needed.setdefault(name, f"{req.name}{req.specifier}")
            continue
        for line in present[name]:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in {"", *req.extras}):
                dep.marker = None
                todo.append(dep)
    return sorted(needed.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requirements")
    r.add_argument("variant")
    r.add_argument("out", type=Path)
    r.add_argument("--torch-wheel")
    f = sub.add_parser("find-cuda-torch")
    f.add_argument("version")
    f.add_argument("dirs", nargs="*", type=Path)
    d = sub.add_parser("digest")
    d.add_argument("paths", nargs="+", type=Path)
    m = sub.add_parser("missing")
    m.add_argument("wheels", type=Path)
    m.add_argument("reqs", type=Path)
    m.add_argument("python_version")
    sub.add_parser("project-version")
    sub.add_parser("torch-version")
    args = p.parse_args(argv)
    try:
        if args.cmd == "requirements":
            lines = requirements(project_table()["dependencies"], args.variant, args.torch_wheel)
            args.out.write_text("\n".join(lines) + "\n")
        elif args.cmd == "find-cuda-torch":
            print(find_cuda_torch(args.version, args.dirs))
        elif args.cmd == "digest":
            print(digest(args.paths))
        elif args.cmd == "missing":
            for line in missing(args.wheels, args.reqs.read_text().splitlines(), args.python_version):
                print(line)
        elif args.cmd == "project-version":
            print(project_table()["version"])
        elif args.cmd == "torch-version":
            print(torch_version(project_table()["dependencies"]))
    except ImageBuildError as e:
        print(f"image: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
