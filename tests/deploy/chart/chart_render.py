"""Render helm/swaserve with helm-python-sdk (Helm v4) once per values file, shared by the tests.

    python -m tests.deploy.chart.chart_render --write-golden   regenerate golden/*.yaml from examples/

A golden file is the whole release as `helm template` would print it (release `demo`, namespace
`swaserve`), one document per object in template order, so a diff of it is the diff a user's
cluster would see.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "swaserve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden"
RELEASE, NAMESPACE = "demo", "swaserve"
KUBE_VERSION = "1.31"  # the current Kubernetes the rendered objects are validated against


@dataclass(frozen=True)
class Rendered:
    manifests: dict[str, str]  # template path -> text

    @functools.cached_property
    def objects(self) -> list[dict[str, Any]]:
        return [
            o
            for path in sorted(self.manifests)
            if path.endswith(".yaml")
            for o in yaml.safe_load_all(self.manifests[path])
            if o
        ]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} objects; have {self.names()}"
        return found[0]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def names(self) -> list[str]:
        return [f"{o['kind']}/{o['metadata']['name']}" for o in self.objects]

    def text(self) -> str:
        docs = []
        for path in sorted(self.manifests):
            body = self.manifests[path].strip("\n")
            if path.endswith(".yaml") and body.strip():
                docs.append(f"---\n# Source: {path}\n{body}\n")
        return "".join(docs)


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None) -> Rendered:
    return Rendered(chart().render(values or {}, name=RELEASE, namespace=NAMESPACE))


def example_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


@functools.cache
def render_example(name: str) -> Rendered:
    return render(example_values(CHART / "examples" / f"{name}.yaml"))


def golden_path(example: Path) -> Path:
    return GOLDEN / example.name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write-golden", action="store_true", required=True)
    p.parse_args(argv)
    GOLDEN.mkdir(exist_ok=True)
    for example in EXAMPLES:
        golden_path(example).write_text(render_example(example.stem).text())
        print(f"wrote {golden_path(example).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
