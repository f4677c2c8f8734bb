"""The process kubelet stand-in's pure parts against Kubernetes' own rules: $(VAR) expansion (the
cases of k8s.io/kubernetes third_party/forked/golang/expansion), downward-API fields, and the mount
and wildcard-address rewriting that stands in for mount and network namespaces. No cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.pod_spec import NODE_NAME, MountMap, expand, field_value

ENV = {"A": "a", "POD_IP": "10.1.2.3", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("$(A)", "a"),
        ("x$(A)y$(A)", "xaya"),
        ("$(UNKNOWN)", "$(UNKNOWN)"),  # an unknown name stays as written
        ("$$(A)", "$(A)"),  # $$ escapes
        ("$$$(A)", "$a"),
        ("$(EMPTY)x", "x"),
        ("$A", "$A"),  # only the parenthesised form expands
        ("$(A", "$(A"),  # unclosed
        ("trailing$", "trailing$"),
        ("redis://:$(A)@h:1/0", "redis://:a@h:1/0"),
    ],
)
def test_expand(text: str, want: str) -> None:
    assert expand(text, ENV) == want


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"k": "v"}, "annotations": {}},
    "spec": {"serviceAccountName": "sa"},
    "status": {"podIP": "127.9.0.2", "hostIP": "127.0.0.1"},
}


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("metadata.name", "p"),
        ("metadata.namespace", "ns"),
        ("metadata.uid", "u1"),
        ("metadata.labels['k']", "v"),
        ("metadata.annotations['missing']", ""),
        ("spec.nodeName", NODE_NAME),
        ("spec.serviceAccountName", "sa"),
        ("status.podIP", "127.9.0.2"),
    ],
)
def test_field_value(path: str, want: str) -> None:
    assert field_value(POD, path) == want


def test_field_value_unsupported_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fieldRef 'status.phase' is not supported"):
        field_value(POD, "status.phase")


def test_mount_and_wildcard_rewrite(tmp_path: Path) -> None:
    m = MountMap(
        {"/models": tmp_path / "m", "/models/big": tmp_path / "b", "/var/lib/x": tmp_path / "h"}, "127.9.0.2"
    )
    assert m.rewrite("--model=/models/mimo-tiny") == f"--model={tmp_path}/m/mimo-tiny"
    assert m.rewrite("/models/big/w") == f"{tmp_path}/b/w"  # the longest mountPath wins
    assert m.rewrite("/models") == f"{tmp_path}/m"
    assert m.rewrite("/modelsx/a") == "/modelsx/a"  # not a path under the mount
    assert m.rewrite("/srv/models/a") == "/srv/models/a"  # the mountPath inside another path
    assert m.rewrite("a:/var/lib/x,b") == f"a:{tmp_path}/h,b"
    assert m.rewrite("--host=0.0.0.0") == "--host=127.9.0.2"
    assert m.rewrite("10.0.0.0/8 0.0.0.0:80") == "10.0.0.0/8 127.9.0.2:80"
