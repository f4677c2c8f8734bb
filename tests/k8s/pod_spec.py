"""The pod-spec rules the process kubelet stand-in (process_kubelet.py) follows, as pure functions:
Kubernetes' $(VAR) expansion, downward-API fields, named ports, and the rewriting of mount paths and
of the wildcard address that stands in for mount and network namespaces. What an image would bring
(ENTRYPOINT, CMD, ENV, WORKDIR) is an ImageConfig. Tested without a cluster in test_process_kubelet.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_NAME = "process-kubelet-standin"  # spec.nodeName of a pod nobody scheduled


@dataclass(frozen=True)
class ImageConfig:
    """What the stand-in knows of an image: its ENTRYPOINT, CMD, ENV and WORKDIR."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""


def swaserve_image() -> ImageConfig:
    """The Containerfile's image, played by this checkout's venv (`tini -- swaserve` -> the swaserve script)."""
    script = Path(sys.executable).parent / "swaserve"
    env = {"SWASERVE_HOME": "/var/lib/swaserve", "HOME": "/var/lib/swaserve", "PYTHONUNBUFFERED": "1"}
    return ImageConfig((str(script),), ("--help",), env | {"SWASERVE_VARIANT": "cpu"}, "/var/lib/swaserve")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a known name is replaced, an unknown one stays as written,
    `$$` is a literal `$` (so `$$(X)` gives `$(X)`)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if text[i + 1] == "(" and (j := text.find(")", i + 2)) != -1:
                name = text[i + 2 : j]
                out.append(env[name] if name in env else text[i : j + 1])
                i = j + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def field_value(pod: dict[str, Any], path: str) -> str:
    """A downward-API fieldRef of the pod (as a dict in the API's camelCase)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
    }
    if path not in simple:
        raise ValueError(f"pod {meta['name']}: fieldRef {path!r} is not supported by the stand-in")
    return str(simple[path])


class MountMap:
    """Container paths (mountPath -> host folder) rewritten inside strings, longest mountPath first;
    the wildcard address goes to the pod's IP."""

    def __init__(self, mounts: Mapping[str, Path], pod_ip: str) -> None:
        self.mounts = sorted(mounts.items(), key=lambda kv: -len(kv[0]))
        self.pod_ip = pod_ip

    def rewrite(self, text: str) -> str:
        for mount, host in self.mounts:
            pattern = r"(?<![\w./-])" + re.escape(mount.rstrip("/")) + r"(?=/|$|[^\w.-])"
            text = re.sub(pattern, str(host).replace("\\", "\\\\"), text)
        return re.sub(r"(?<![\d.])0\.0\.0\.0(?![\d.])", self.pod_ip, text)


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container {container['name']}: no port named {port!r}")
